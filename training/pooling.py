"""Global pooling of CNN feature maps (B, C, H, W) -> (B, C): GeM, SPoC (average), MAC (max) and R-MAC.

Plain functions do the work; the modules are thin wrappers so a pooling can sit in an nn.Sequential.
All reductions are over the spatial dims (no kernel size taken from the input), so the modules export
to ONNX with dynamic H and W.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from training.errors import TrainingError

__all__ = ["gem", "spoc", "mac", "rmac", "GeM", "SPoC", "MAC", "RMAC", "build_pooling", "POOLINGS"]


def _check_feature_map(x: Tensor) -> None:
    if x.dim() != 4:
        raise TrainingError(
            f"pooling expects a feature map (B, C, H, W), got shape {tuple(x.shape)}; "
            "pool the backbone's last conv output, not its flattened features"
        )


def gem(x: Tensor, p: float | Tensor = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalized-mean pooling (Radenović et al. 2018): (mean over H, W of x.clamp(eps) ** p) ** (1/p).

    p=1 is average pooling (SPoC), p -> inf approaches max pooling (MAC). The clamp keeps the power
    defined (features after ReLU are >= 0; exact zeros would break the gradient of pow(1/p)).
    """
    _check_feature_map(x)
    if isinstance(p, (int, float)) and p <= 0:
        raise TrainingError(f"GeM power p must be > 0, got {p}")
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def spoc(x: Tensor) -> Tensor:
    """Sum-pooled convolutional features (Babenko & Lempitsky 2015), as a mean so scale is size-free."""
    _check_feature_map(x)
    return x.mean(dim=(-2, -1))


def mac(x: Tensor) -> Tensor:
    """Maximum activation of convolutions (Tolias et al. 2016): per-channel spatial max."""
    _check_feature_map(x)
    return x.amax(dim=(-2, -1))


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC's square regions (top, left, height, width) on an h x w map: at level l, squares of side
    2 min(h, w) / (l + 1) on a grid whose step along the long side is chosen for ~`overlap` between
    neighbours (Tolias et al. 2016, as in cnnimageretrieval-pytorch)."""
    side = min(h, w)
    steps = [2, 3, 4, 5, 6, 7]
    extra = 0  # additional regions along the long side
    if h != w:
        b = [(max(h, w) - side) / (s - 1) for s in steps]
        extra = 1 + min(range(len(steps)), key=lambda i: abs((side * side - side * b[i]) / (side * side) - overlap))
    regions = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        n_w = level + (extra if w > h else 0)
        n_h = level + (extra if h > w else 0)
        bw = 0 if n_w == 1 else (w - wl) / (n_w - 1)
        bh = 0 if n_h == 1 else (h - wl) / (n_h - 1)
        tops = [int(math.floor(wl2 + i * bh) - wl2) for i in range(n_h)]
        lefts = [int(math.floor(wl2 + j * bw) - wl2) for j in range(n_w)]
        regions += [(t, lft, wl, wl) for t in tops for lft in lefts]
    return regions


def rmac(x: Tensor, levels: int = 3, eps: float = 1e-6) -> Tensor:
    """Regional MAC (Tolias et al. 2016): the L2-normalised MAC of the whole map plus of every R-MAC region
    (`rmac_regions`), each L2-normalised, summed (normalise the result for a descriptor)."""
    _check_feature_map(x)
    h, w = (int(n) for n in x.shape[-2:])
    total = torch.nn.functional.normalize(mac(x), dim=1, eps=eps)
    for top, left, rh, rw in rmac_regions(h, w, levels):
        total = total + torch.nn.functional.normalize(mac(x[..., top:top + rh, left:left + rw]), dim=1, eps=eps)
    return total


class GeM(nn.Module):
    """GeM pooling with power p; learnable (an nn.Parameter of shape (1,)) or fixed (a buffer)."""

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise TrainingError(f"GeM power p must be > 0, got {p}")
        self.eps = eps
        self.learnable = learnable
        p_tensor = torch.full((1,), float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, learnable={self.learnable}, eps={self.eps}"


class SPoC(nn.Module):
    """Average pooling over H, W (see `spoc`)."""

    def forward(self, x: Tensor) -> Tensor:
        return spoc(x)


class MAC(nn.Module):
    """Max pooling over H, W (see `mac`)."""

    def forward(self, x: Tensor) -> Tensor:
        return mac(x)


class RMAC(nn.Module):
    """Regional MAC over `levels` scales of regions (see `rmac`)."""

    def __init__(self, levels: int = 3) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return rmac(x, self.levels)


POOLINGS: dict[str, Callable[..., nn.Module]] = {"gem": GeM, "spoc": SPoC, "mac": MAC, "rmac": RMAC}


def build_pooling(name: str, **kwargs) -> nn.Module:
    """Build a pooling module by name ("gem", "spoc", "mac" or "rmac"); kwargs go to its constructor."""
    key = name.lower()
    if key not in POOLINGS:
        raise TrainingError(f"unknown pooling {name!r}; choose one of {sorted(POOLINGS)}")
    return POOLINGS[key](**kwargs)
