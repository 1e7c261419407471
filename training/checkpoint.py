"""One file format for every torch artifact: `save_checkpoint` / `load_checkpoint` / `read_header`.

After sentence-transformers' Module.py + modules.json: each saveable module has a `module_type`,
`module_config()` (its config keys as JSON, nested for composites) and `from_config(config)`. A file
is one safetensors state dict (pickle-free) whose header metadata holds the config, preprocessing spec,
embedding dim and meta, so reading what a file is costs its header only. Loading is strict: the first
missing or unexpected tensor is named. v1 files (torch pickles): embedding models load; the others
name the command to re-run. Also the torch-file helpers training/ shares (atomic write, state dicts).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdk.bundle import save_atomic
from sdk.preprocess import PreprocessSpec
from training.errors import TrainingError

FORMAT = "retrieval-sdk/module"
VERSION = 2
# module_type -> the class that rebuilds it (imported when a file of that type is loaded)
MODULE_TYPES = {
    "embedding_model": "training.models:EmbeddingModel",
    "gallery_extractor": "training.extractors.base:GalleryExtractor",
    "aff_gallery": "training.aff.gallery:AFFGallery",
    "mabnet": "training.mabnet.model:MABNet",
}
V1_RERUN = {  # v1 torch-pickle formats that do not load any more, and what writes them anew
    "retrieval-sdk/gallery-extractor": "`retrieval-sdk train aff` (it retrains the extractors into .safetensors)",
    "retrieval-sdk/aff-gallery": "`retrieval-sdk train aff` (it writes gallery.safetensors, exportable to ONNX)",
}
# containers that training scripts commonly wrap a state dict in (pycls saves "model_state")
_STATE_DICT_KEYS = ("model_state", "state_dict", "model", "model_state_dict")


class CheckpointError(TrainingError):
    """A checkpoint file is not one of ours, does not match its config, or is of an old format."""


@dataclass
class CheckpointMeta:
    """What travels with the weights: the space id, the role and free-form training facts."""

    embedding_space: str = ""
    role: str = "query"  # query | gallery | extractor
    name: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ torch files


def read_torch_file(path: str | Path, error: type[Exception], what: str, hint: str = "") -> object:
    """torch.load (weights only, CPU) with `error` for a missing or unreadable file; `hint` (what to do)
    ends both messages."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise error(f"cannot read {what} {path}: {e.__class__.__name__}: {e}{hint}") from None


def read_state_dict_file(path: str | Path, error: type[Exception], what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """A state dict of tensors, unwrapped from the usual containers, without DataParallel's 'module.' prefix."""
    obj = read_torch_file(path, error, what, hint)
    for key in _STATE_DICT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise error(f"{path} holds no state dict of tensors (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# ------------------------------------------------------------------------------------------ module format


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """load_state_dict with every key accounted for; a missing, unexpected or reshaped tensor is one line."""
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{origin}: weights do not match the config saved with them: {len(missing)} missing tensor(s)"
            + (f" (e.g. {missing[0]})" if missing else "") + f", {len(extra)} unexpected"
            + (f" (e.g. {extra[0]})" if extra else "") + "; the file was edited or written by another version: "
            "save it again with training.checkpoint.save_checkpoint")
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{origin}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)} but the config builds "
                              f"{tuple(expected[bad[0]].shape)}; the file was edited or written by another version")
    module.load_state_dict(state, strict=True)


def save_checkpoint(module: nn.Module, path: str | Path, meta: CheckpointMeta | None = None) -> Path:
    """Write `module` (config + weights + preprocessing + meta) as one .safetensors file, atomically."""
    from safetensors.torch import save_file

    if getattr(module, "module_type", None) not in MODULE_TYPES:
        raise CheckpointError(f"{type(module).__name__} is not a saveable module (one of {sorted(MODULE_TYPES)})")
    header = {"format": FORMAT, "version": str(VERSION), "type": module.module_type,
              "config": json.dumps(module.module_config()), "preprocess": json.dumps(module.spec.to_dict()),
              "embedding_dim": str(int(module.embedding_dim)), "meta": json.dumps(asdict(meta or CheckpointMeta()))}
    tensors, seen = {}, set()
    for key, value in module.state_dict().items():
        t = value.detach().to("cpu", memory_format=torch.contiguous_format).contiguous()
        if t.data_ptr() in seen and t.numel():  # safetensors stores no aliases: a tied tensor gets its own copy
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[key] = t
    return save_atomic(tensors, path, lambda t, p: save_file(t, str(p), metadata=header))


def read_header(path: str | Path) -> dict:
    """What a module file holds without reading its weights: type, config, preprocess, embedding_dim, meta."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; train one with `retrieval-sdk quickstart` or "
                              "`retrieval-sdk train aff`")
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not safetensors: a v1 torch file, or not a checkpoint at all
        return {"format": "v1"}
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a retrieval-sdk module (no '{FORMAT}' header); "
                              "weights from elsewhere load through create_backbone(pretrained=PATH)")
    return {"format": FORMAT, "version": int(raw["version"]), "type": raw["type"],
            "config": json.loads(raw["config"]), "preprocess": json.loads(raw["preprocess"]),
            "embedding_dim": int(raw["embedding_dim"]), "meta": CheckpointMeta(**json.loads(raw["meta"]))}


def _build(module_type: str, config: dict, state: dict[str, torch.Tensor], preprocess: dict, path: Path) -> nn.Module:
    """The module of `module_type` rebuilt from its config, weights (loaded strictly) and spec, in eval mode."""
    if module_type not in MODULE_TYPES:
        raise CheckpointError(f"{path}: unknown module type {module_type!r}: a file from a newer version?")
    where, name = MODULE_TYPES[module_type].split(":")
    try:
        module = getattr(importlib.import_module(where), name).from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} describes a {module_type} this version cannot build: {e}") from None
    load_strict(module, state, str(path))
    module.spec = PreprocessSpec.from_dict(preprocess)
    return module.eval()


def load_checkpoint(path: str | Path, expect: str | None = None) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the module saved at `path` (eval mode) and its meta; `expect` checks its module_type."""
    path = Path(path)
    header = read_header(path)
    if header["format"] == "v1":
        return _load_v1(path, expect)
    if expect is not None and header["type"] != expect:
        raise CheckpointError(f"{path} holds a {header['type']}, not a {expect}")
    from safetensors.torch import load_file

    return _build(header["type"], header["config"], load_file(str(path)), header["preprocess"], path), header["meta"]


def _load_v1(path: Path, expect: str | None) -> tuple[nn.Module, CheckpointMeta]:
    """A torch-pickle checkpoint of v1: embedding models load; the others name what to re-run."""
    payload = read_torch_file(path, CheckpointError, "retrieval-sdk checkpoint")
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt in V1_RERUN:
        raise CheckpointError(f"{path} is a {fmt} file of v1, which this version no longer reads; re-run "
                              f"{V1_RERUN[fmt]}")
    if fmt != "retrieval-sdk/checkpoint" or (expect not in (None, "embedding_model")):
        raise CheckpointError(f"{path} is not a retrieval-sdk checkpoint; train one with `retrieval-sdk quickstart` "
                              "or save it with training.checkpoint.save_checkpoint")
    module = _build("embedding_model", payload["config"], payload["state_dict"], payload["preprocess"], path)
    return module, CheckpointMeta(**payload["meta"])
