"""Global pooling of CNN feature maps (B, C, H, W) -> (B, C): GeM, SPoC (average) and MAC (max).

Plain functions do the work; the modules are thin wrappers so a pooling can sit in an nn.Sequential.
All reductions are over the spatial dims (no kernel size taken from the input), so the modules export
to ONNX with dynamic H and W.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from training.errors import TrainingError

__all__ = ["gem", "spoc", "mac", "GeM", "SPoC", "MAC", "build_pooling", "POOLINGS"]


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


POOLINGS: dict[str, Callable[..., nn.Module]] = {"gem": GeM, "spoc": SPoC, "mac": MAC}


def build_pooling(name: str, **kwargs) -> nn.Module:
    """Build a pooling module by name ("gem", "spoc" or "mac"); kwargs go to its constructor."""
    key = name.lower()
    if key not in POOLINGS:
        raise TrainingError(f"unknown pooling {name!r}; choose one of {sorted(POOLINGS)}")
    return POOLINGS[key](**kwargs)
