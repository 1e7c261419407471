"""Reading and writing torch checkpoint files, with one-line errors that name the file and the fix.

Every checkpoint the project writes (query/gallery models, gallery extractors, the AFF gallery) is a dict
with a "format" header; files from elsewhere (released DELG/DOLG/CVNet, ImageNet weights) are bare or
wrapped state dicts. Each caller passes its own exception class so its users catch one error type.
"""

from __future__ import annotations

from pathlib import Path

import torch

# containers that training scripts commonly wrap a state dict in (pycls saves "model_state")
_STATE_DICT_KEYS = ("model_state", "state_dict", "model", "model_state_dict")


def save_atomic(payload: dict, path: str | Path) -> Path:
    """torch.save via a temporary file and a rename: a crash never leaves a half-written file under `path`."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


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


def read_tagged(path: str | Path, error: type[Exception], what: str, fmt: str, fix: str) -> dict:
    """A checkpoint written by this project: the payload dict after checking its "format" header."""
    payload = read_torch_file(path, error, what, f"; {fix}")
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise error(f"{path} is not a {what} (no '{fmt}' header); {fix}")
    return payload


def read_state_dict_file(path: str | Path, error: type[Exception], what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """A state dict of tensors, unwrapped from the usual containers, without DataParallel's 'module.' prefix."""
    obj = read_torch_file(path, error, what, hint)
    for key in _STATE_DICT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise error(f"{path} holds no state dict of tensors (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}
