"""Checkpoint(s) -> model bundle folder: exported files + manifest.json (see sdk/bundle.py)."""

from __future__ import annotations

from pathlib import Path

from export.onnx import export_onnx
from sdk.bundle import Manifest, ModelEntry, describe_file, write_manifest
from training.models import load_checkpoint


def export_bundle(query_checkpoint: str | Path, out: str | Path, gallery_checkpoint: str | Path | None = None,
                  formats: tuple[str, ...] = ("onnx",)) -> Manifest:
    """Export the query model (and optionally the gallery model) into `out` and write its manifest."""
    out = Path(out)
    models, spaces = {}, set()
    for role, ckpt in (("query", query_checkpoint), ("gallery", gallery_checkpoint)):
        if ckpt is None:
            continue
        model, meta = load_checkpoint(ckpt)
        spaces.add(meta.embedding_space)
        files = []
        if "onnx" in formats:
            export_onnx(model, out / f"{role}.onnx", input_size=model.spec.input_size)
            files.append(describe_file(out, f"{role}.onnx", format="onnx", precision="fp32"))
        models[role] = ModelEntry(name=meta.name or f"{model.config.backbone}-{model.config.pooling}", role=role,
                                  embedding_dim=model.embedding_dim, preprocess=model.spec, files=files,
                                  source_checkpoint=str(ckpt))
    if len(spaces) != 1:
        raise ValueError(f"query and gallery checkpoints are from different embedding spaces {sorted(spaces)}; "
                         "export models trained into one space together")
    manifest = Manifest(embedding_space=spaces.pop(), models=models)
    write_manifest(out, manifest)
    return manifest
