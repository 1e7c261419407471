"""Let timm import on CPU-only torch 2.13.0 when the installed torchvision is a CUDA build.

The only torchvision release matching torch 2.13.0 on the registry is a CUDA build whose compiled
ops fail to load here. Its pure-Python import still registers fake kernels for `torchvision::nms`
and `torchvision::qnms`, which raises "operator torchvision::nms does not exist" unless their
schemas exist. We define those two schemas (as torchvision's C++ does) before the first import.
Nothing in this project calls these ops; if torchvision's own _C loads, this module does nothing.
Import timm through `training.backbones` (which imports this first), never directly.
"""

from __future__ import annotations

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # keep the Library alive: dropping it unregisters the schemas


def install() -> None:
    global _LIB
    if _LIB is not None:
        return
    missing = [name for name in _SCHEMAS if not _schema_exists(name)]
    if not missing:
        return
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _LIB.define(_SCHEMAS[name])


def _schema_exists(name: str) -> bool:
    try:
        torch._C._get_schema(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


install()
