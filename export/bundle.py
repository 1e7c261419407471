"""Checkpoint(s) -> model bundle folder: exported files + manifest.json (see sdk/bundle.py and docs/export.md).

The query model goes to every requested format (ONNX, TFLite, CoreML) and precision; the gallery model
to ONNX (float32) so the cloud side embeds without torch. fp32 files are always written, also when
only fp16/int8 are asked for: they are the reference `verify` compares the smaller files against, and
the fallback for runtimes without fp16/int8 kernels. Each file is checked structurally and for parity
with torch right after export, and the results go to manifest.extra["export"].
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import shutil
import time
from contextlib import suppress
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from export.calibration import RANGE_RULE
from export.errors import ExportError, require
from export.images import ImageSet, load_image_set, random_images
from sdk.backends import coreml_can_predict, open_runner
from sdk.bundle import (FORMATS, MANIFEST, PRECISIONS, BundleError, Manifest, ModelEntry, ModelFile, describe_file,
                        read_manifest, write_manifest)
from sdk.preprocess import PreprocessSpec
from sdk.vectors import compare_embeddings

EXTENSIONS = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage"}
LAYOUTS = {"onnx": "NCHW", "tflite": "NHWC", "coreml": "NCHW"}
PARITY_IMAGES = 8
_VERSIONS = ("retrieval-sdk", "torch", "timm", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert",
             "ai-edge-quantizer", "coremltools")


def file_name(role: str, format: str, precision: str) -> str:
    """query.onnx, query.int8.onnx, query.fp16.tflite, query.mlpackage, gallery.onnx, ..."""
    return role + ("" if precision == "fp32" else f".{precision}") + EXTENSIONS[format]


def parse_choices(values: Iterable[str] | str | None, allowed: tuple[str, ...], what: str,
                  all_means: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """'onnx,tflite' / ['onnx', 'tflite'] / 'all' -> ('onnx', 'tflite'), in `allowed` order, validated."""
    if values is None:
        return ()
    items = [values] if isinstance(values, str) else list(values)
    chosen = set()
    for item in items:
        for v in (s.strip().lower() for s in item.split(",")):
            if not v:
                continue
            if v == "all" and all_means:
                chosen.update(all_means)
            elif v in allowed:
                chosen.add(v)
            else:
                extra = "|all" if all_means else ""
                raise ExportError(f"unknown {what} {v!r}: choose from {'|'.join(allowed)}{extra}")
    return tuple(a for a in allowed if a in chosen)


def export_bundle(query_checkpoint: str | Path, out: str | Path, gallery_checkpoint: str | Path | None = None,
                  formats: Iterable[str] | str = ("onnx",), precisions: Iterable[str] | str = ("fp32",),
                  calibration: str | Path | None = None, *, max_calibration_images: int = 200,
                  coreml_image_input: bool = False, tflite_metadata: bool = True, progress: bool = False,
                  log: Callable[[str], None] | None = None) -> Manifest:
    """Export the query model (and optionally the gallery model) into `out` and write its manifest.

    formats: onnx / tflite / coreml (or 'all'); precisions: fp32 / fp16 / int8 (fp32 always included);
    calibration: folder of real photos, required for int8. Raises ExportError (a ValueError) with the
    fix in the message for bad input.
    """
    from training.models import load_checkpoint

    log = log or (lambda msg: None)
    formats = parse_choices(formats, FORMATS, "format", all_means=FORMATS) or ("onnx",)
    precisions = tuple(p for p in PRECISIONS if p in {"fp32", *parse_choices(precisions, PRECISIONS, "precision")})
    if "int8" in precisions and calibration is None:
        raise ExportError("int8 quantization is calibrated on real images: pass --calibration DIR, a folder of "
                          "50-300 photos like the ones your users will query with")
    if calibration is not None:
        from export.images import find_images

        find_images(calibration, "calibration")  # fail fast on a missing or empty folder
    # Fail before any slow conversion when a needed optional package is missing.
    if "onnx" in formats:
        require("onnx"), require("onnxscript"), require("onnxruntime")
    if "tflite" in formats:
        require("litert_torch"), require("ai_edge_litert")
        if set(precisions) - {"fp32"}:
            require("ai_edge_quantizer")
    if "coreml" in formats:
        require("coremltools")

    out = Path(out)
    loaded = {role: (Path(ckpt), *load_checkpoint(ckpt))  # role -> (checkpoint, model, meta)
              for role, ckpt in (("query", query_checkpoint), ("gallery", gallery_checkpoint)) if ckpt is not None}
    spaces = {meta.embedding_space for _, _, meta in loaded.values()}
    if len(spaces) != 1:
        raise ExportError(f"query and gallery checkpoints are from different embedding spaces {sorted(spaces)}; "
                          "export models trained into one space together")
    space = spaces.pop()
    _remove_previous(out)
    out.mkdir(parents=True, exist_ok=True)

    versions = {}
    for dist in _VERSIONS:
        with suppress(_md.PackageNotFoundError):
            versions[dist] = _md.version(dist)
    record: dict = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "versions": versions, "parity": {}, "checks": {}, "notes": []}
    models = {}
    for role, (ckpt, model, meta) in loaded.items():
        spec: PreprocessSpec = model.spec
        calib = None
        if calibration is not None:
            limit = max_calibration_images if role == "query" else PARITY_IMAGES  # gallery: parity only
            calib = load_image_set(calibration, spec, max_images=limit, what="calibration image", progress=progress)
        parity = calib if calib is not None else random_images(4, spec)
        parity = ImageSet(parity.name, parity.paths[:PARITY_IMAGES], parity.pixels[:PARITY_IMAGES], None)
        metadata = {"embedding_dim": model.embedding_dim, "embedding_space": space, "role": role,
                    "model_name": meta.name or f"{model.config.backbone}-{model.config.pooling}",
                    "preprocess": spec.to_dict()}
        role_formats = formats if role == "query" else ("onnx",)
        role_precisions = precisions if role == "query" else ("fp32",)
        files = []
        for fmt in role_formats:
            for prec in role_precisions:
                name = file_name(role, fmt, prec)
                log(f"exporting {role} model -> {out / name}")
                t0 = time.perf_counter()
                facts = _export_one(model, out, fmt, prec, spec, calib, metadata, coreml_image_input, progress)
                record["checks"][name] = facts
                if fmt == "tflite" and tflite_metadata:
                    _write_tflite_metadata(out / name, spec, metadata, space, record, log)
                record["parity"][name] = _parity(model, out, name, fmt, prec, spec, parity)
                log("  " + describe_parity(name, record["parity"][name]) + f" [{time.perf_counter() - t0:.1f} s]")
                files.append(describe_file(out, name, **_file_fields(fmt, prec)))
        if calib is not None and role == "query":
            record["calibration"] = {"folder": str(Path(calibration)), "images": len(calib.paths),
                                     "max_images": max_calibration_images, "activation_ranges": RANGE_RULE}
        models[role] = ModelEntry(name=metadata["model_name"], role=role, embedding_dim=model.embedding_dim,
                                  preprocess=spec, files=files, source_checkpoint=str(ckpt.resolve()))
    if "coreml" in formats:
        record["coreml_input"] = "image" if coreml_image_input else "tensor"
    manifest = Manifest(embedding_space=space, models=models, extra={"export": record})
    write_manifest(out, manifest)
    return manifest


def _file_fields(fmt: str, prec: str) -> dict:
    """What a bundle file of this format records besides its name and hash: layout and batch."""
    return {"format": fmt, "precision": prec, "layout": LAYOUTS[fmt],
            "batch": "1" if fmt in ("tflite", "coreml") else "dynamic"}


def _embed_file(path: Path, fmt: str, prec: str, spec: PreprocessSpec, nchw: np.ndarray) -> np.ndarray:
    """Embed a normalised NCHW batch with a just-written file, through the SDK's runtime layer."""
    return open_runner(path, ModelFile(path=path.name, **_file_fields(fmt, prec)), spec=spec).embed_nchw(nchw)


def describe_parity(name: str, p: dict) -> str:
    text = f"{name}: "
    if p.get("images"):
        text += (f"parity vs torch on {p['images']} images: max abs diff {p['max_abs_diff']:.2e}, "
                 f"min cosine {p['min_cosine']:.6f}")
    return text + (f" ({p['note']})" if p.get("note") else "")


def _remove_previous(out: Path) -> None:
    """Delete the files an earlier export listed in out/manifest.json, so none goes stale."""
    if not (out / MANIFEST).is_file():
        return
    try:
        old = read_manifest(out, verify=False)
    except BundleError:
        return
    for entry in old.models.values():
        for f in entry.files:
            p = out / f.path
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def _export_one(model, out: Path, fmt: str, prec: str, spec: PreprocessSpec, calib: ImageSet | None,
                metadata: dict, coreml_image_input: bool, progress: bool) -> dict:
    """Write one file and return its structural-check facts."""
    role = metadata["role"]
    path = out / file_name(role, fmt, prec)
    fp32 = out / file_name(role, fmt, "fp32")
    if fmt == "onnx":
        from export import onnx as ox

        onnx_meta = {**metadata, "precision": prec}
        if prec == "fp32":
            ox.export_onnx(model, path, spec.input_size, metadata=onnx_meta)
        elif prec == "fp16":
            ox.convert_fp16(fp32, path)
            ox.add_metadata(path, onnx_meta)
        else:
            nchw = calib.batch(spec)
            search = _int8_search("onnx", fp32, path, nchw, spec, progress,
                                  lambda k, bar: ox.quantize_int8(fp32, path, nchw, progress=bar, float_convs=k))
            ox.add_metadata(path, onnx_meta)
        facts = ox.check_onnx(path, model.embedding_dim, dynamic_hw=ox.dynamic_hw(model))
    elif fmt == "tflite":
        from export import tflite as tf

        if prec == "fp32":
            tf.export_tflite(model, path, spec.input_size)
        elif prec == "fp16":
            tf.convert_fp16(fp32, path)
        else:
            nchw = calib.batch(spec)
            search = _int8_search("tflite", fp32, path, nchw, spec, progress,
                                  lambda k, bar: tf.quantize_int8(fp32, path, nchw.transpose(0, 2, 3, 1),
                                                                  progress=bar, float_convs=k))
        facts = tf.check_tflite(path, model.embedding_dim, spec.input_size)
        facts.pop("signatures", None)
    else:
        from export import coreml as cm

        cm.export_coreml(model, path, spec, prec, image_input=coreml_image_input, metadata=metadata)
        facts = cm.check_coreml(path, model.embedding_dim, spec, prec, metadata["embedding_space"])
        facts.pop("metadata", None)
    if prec == "int8" and fmt != "coreml":
        facts["int8"] = search  # the float-convs search that chose the file
    return facts


# int8: accuracy-aware choice of how many leading conv layers stay float (see export.onnx.quantize_int8).
# Each candidate is quantized and compared with the fp32 file on the calibration images; the first that
# reaches the target wins, else the best one. Models that quantize well stop at 0 (one conversion).
INT8_TARGET_MIN_COSINE = 0.995
FLOAT_CONV_STEPS = (0, 2, 4, 6, 8)


def _int8_search(fmt: str, fp32: Path, path: Path, nchw: np.ndarray, spec: PreprocessSpec,
                 progress: bool, quantize: Callable[[int, str | None], object]) -> dict:
    """`quantize(k, bar)` writes the int8 file with k leading convs float, showing a bar labelled `bar`
    (None: no bar): one bar per candidate, each saying which candidate it calibrates."""
    def embed(p: Path) -> np.ndarray:
        return _embed_file(p, fmt, "fp32" if p == fp32 else "int8", spec, nchw)

    ref = embed(fp32)
    tried: dict[int, float] = {}
    best = None
    for k in FLOAT_CONV_STEPS:
        quantize(k, f"int8 {fmt} search, {k} float convs" if progress else None)
        tried[k] = compare_embeddings(embed(path), ref)[1]
        if best is None or tried[k] > tried[best] + 1e-4:
            best = k
        if tried[k] >= INT8_TARGET_MIN_COSINE:
            break
    if k != best:
        quantize(best, f"int8 {fmt}, best of the search: {best} float convs" if progress else None)
    return {"float_leading_convs": best, "calibration_min_cosine": round(tried[best], 6),
            "target_min_cosine": INT8_TARGET_MIN_COSINE, "tried": {str(k): round(c, 6) for k, c in tried.items()}}


def _write_tflite_metadata(path: Path, spec: PreprocessSpec, metadata: dict, space: str, record: dict, log) -> None:
    from export import tflite_support_env as tflite_support

    try:
        tflite_support.write_metadata(path, path, spec, metadata["model_name"], metadata["embedding_dim"], space)
        msg = "written (tflite-support)"
    except ExportError as e:
        msg = f"TFLite metadata NOT written to {path.name}: {e}"
        record["notes"].append(msg)
        log("  warning: " + msg + " (the file works; only tflite-support's Task Library needs the metadata)")
    record.setdefault("tflite_metadata", {})[path.name] = msg


def _parity(model, out: Path, name: str, fmt: str, prec: str, spec: PreprocessSpec, images: ImageSet) -> dict:
    """Embed the parity images with torch and with the file's runtime; max abs diff and min cosine."""
    import torch

    x = images.batch(spec)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    if fmt == "coreml" and not coreml_can_predict():
        if prec == "fp32":
            return {"images": 0, "note": "structural check only: Core ML prediction needs macOS"}
        from export import coreml as cm

        with torch.no_grad():
            got = cm.proxy_model(model, prec)(torch.from_numpy(x)).float().numpy()
        diff, cos = compare_embeddings(got, ref)
        return {"images": len(x), "max_abs_diff": diff, "min_cosine": cos,
                "note": f"{prec} torch proxy; Core ML prediction needs macOS"}
    diff, cos = compare_embeddings(_embed_file(out / name, fmt, prec, spec, x), ref)
    return {"images": len(x), "max_abs_diff": diff, "min_cosine": cos,
            **({"note": "Core ML prediction"} if fmt == "coreml" else {})}
