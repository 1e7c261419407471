"""Embedding heads that sit on a backbone's feature map: L2 normalisation, PCA whitening, and the
Combined Global Descriptor (CGD) head.

Every head's `forward` maps to float32 L2-normalised embeddings (the bundle contract), so it is the
part that gets exported; training-only outputs (auxiliary logits) come from `forward_train`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.pooling import GeM, MAC, SPoC
from training.errors import TrainingError

__all__ = ["L2Norm", "learn_pca_whitening", "apply_pca_whitening", "Whitening", "CGDHead"]


class L2Norm(nn.Module):
    """Scale vectors to unit L2 norm along `dim` (eps guards against the zero vector)."""

    def __init__(self, dim: int = -1, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=self.dim, eps=self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


# --------------------------------------------------------------------------------------- whitening


def learn_pca_whitening(
    features: np.ndarray, out_dim: int | None = None, eps: float = 1e-6, power: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Learn PCA whitening from descriptors (Radenović et al. 2018, "learned whitening" baseline).

    Centre the (N, D) features, eigen-decompose their covariance, keep the top `out_dim` components and
    scale each by (eigenvalue + eps) ** -power. Returns (mean (D,), projection (out_dim, D)), float32, so
    that whitened = (x - mean) @ projection.T has ~identity covariance on the training features with
    power 0.5 (full whitening). power 0.25 is square-rooted whitening (rank distillation's evaluation):
    each component keeps the square root of its variance, so strong directions are damped, not erased.
    """
    if not 0.0 <= power <= 0.5:
        raise TrainingError(f"power must be in [0, 0.5] (0: PCA rotation only, 0.5: full whitening), got {power}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise TrainingError(f"features must be a 2-D array (N, D), got shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise TrainingError(f"need at least 2 feature vectors to learn whitening, got {n}")
    if out_dim is None:
        out_dim = d
    if not 1 <= out_dim <= d:
        raise TrainingError(f"out_dim must be in [1, {d}] (the feature dim), got {out_dim}")
    if out_dim > n - 1:
        raise TrainingError(
            f"out_dim={out_dim} but {n} features span at most {n - 1} directions with variance; "
            f"pass out_dim <= {n - 1} or learn from more features"
        )
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / n
    cov = (cov + cov.T) / 2  # exact symmetry for eigh
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigval)[::-1][:out_dim]
    eigval = np.clip(eigval[order], 0.0, None)
    projection = eigvec[:, order].T * ((eigval + eps) ** -power)[:, None]
    return mean.astype(np.float32), projection.astype(np.float32)


def apply_pca_whitening(features: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Whiten (N, D) features with a learned (mean, projection): (x - mean) @ projection.T (no L2)."""
    return (np.asarray(features, dtype=np.float32) - mean) @ projection.T


class Whitening(nn.Module):
    """Trainable whitening: a fully connected layer W x + b (Radenović et al.: learned end to end,
    optionally initialised from PCA whitening via `from_pca`). Follow it with `L2Norm`."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise TrainingError(f"in_dim and out_dim must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
        self.fc = nn.Linear(in_dim, out_dim, bias=bias)

    @classmethod
    def from_pca(cls, mean: np.ndarray, projection: np.ndarray) -> "Whitening":
        """A Whitening whose W x + b equals projection @ (x - mean) (the output of `learn_pca_whitening`)."""
        projection = np.asarray(projection, dtype=np.float32)
        mean = np.asarray(mean, dtype=np.float32)
        if projection.ndim != 2 or mean.shape != (projection.shape[1],):
            raise TrainingError(
                f"expected mean (D,) and projection (out_dim, D), got {mean.shape} and {projection.shape}"
            )
        out_dim, in_dim = projection.shape
        module = cls(in_dim, out_dim, bias=True)
        with torch.no_grad():
            weight = torch.from_numpy(projection.copy())
            module.fc.weight.copy_(weight)
            module.fc.bias.copy_(-(weight @ torch.from_numpy(mean.copy())))
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


# ------------------------------------------------------------------------------------------- CGD

_GD_POOLINGS = {"S": SPoC, "M": MAC, "G": GeM}


def check_gd_config(gd_config: str, feature_dim: int) -> None:
    """A CGD descriptor configuration: S/M/G letters, each once, and a total dim its branches divide evenly
    (CGDHead checks its own; `train cgd` checks every configuration of a run before any work)."""
    if not isinstance(gd_config, str) or not gd_config or any(c not in _GD_POOLINGS for c in gd_config):
        raise TrainingError(f"descriptor configuration {gd_config!r} must be letters S (SPoC), M (MAC), G (GeM), "
                            "a non-empty string such as 'SG' or 'SMG'")
    if len(set(gd_config)) != len(gd_config):
        raise TrainingError(f"descriptor configuration {gd_config!r} repeats a letter; use each at most once")
    n = len(gd_config)
    if feature_dim < n or feature_dim % n:
        raise TrainingError(f"total dim {feature_dim} is not divisible by the {n} branches of {gd_config!r}; pick a "
                            f"multiple of the {n} branches (e.g. {n * max(1, feature_dim // n)})")


class CGDHead(nn.Module):
    """Combined Global Descriptor head (Jun et al. 2019, arXiv:1903.10663).

    One branch per letter of `gd_config` (S=SPoC, M=MAC, G=GeM with fixed p=`gem_p`, as in the paper):
    pooling -> FC (feature_dim // n_branches, no bias) -> L2; the branches are concatenated and
    L2-normalised again, so each branch slice has norm 1/sqrt(n_branches). With `num_classes`, an
    auxiliary classifier (BatchNorm1d + Linear) on the first branch's pooled descriptor fine-tunes the
    backbone; feed its logits to `label_smoothing_cross_entropy` with temperature scaling.
    """

    def __init__(
        self,
        in_channels: int,
        gd_config: str = "SMG",
        feature_dim: int = 1536,
        num_classes: int | None = None,
        gem_p: float = 3.0,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise TrainingError(f"in_channels must be >= 1, got {in_channels}")
        check_gd_config(gd_config, feature_dim)
        self.in_channels = in_channels
        self.gd_config = gd_config
        self.feature_dim = feature_dim
        branch_dim = feature_dim // len(gd_config)
        self.poolings = nn.ModuleList(
            GeM(p=gem_p, learnable=False) if c == "G" else _GD_POOLINGS[c]() for c in gd_config
        )
        self.projections = nn.ModuleList(nn.Linear(in_channels, branch_dim, bias=False) for _ in gd_config)
        self.norm = L2Norm()
        self.auxiliary: nn.Module | None = None
        self.set_classes(num_classes)

    def set_classes(self, num_classes: int | None) -> None:
        """A fresh auxiliary classifier for `num_classes` (None removes it): training adds one for its
        labels, and the saved, exported model carries none (`forward` never uses it)."""
        if num_classes is not None and num_classes < 2:
            raise TrainingError(f"num_classes must be >= 2 (or None for no auxiliary classifier), got {num_classes}")
        self.num_classes = num_classes
        self.auxiliary = None if num_classes is None else nn.Sequential(
            nn.BatchNorm1d(self.in_channels), nn.Linear(self.in_channels, num_classes))

    def _branches(self, feature_map: Tensor) -> tuple[Tensor, Tensor]:
        # the channel check is skipped under the TorchScript tracer (ONNX export), where shapes are tensors
        if feature_map.dim() != 4 or (
            not torch.jit.is_tracing() and feature_map.shape[1] != self.in_channels
        ):
            raise TrainingError(
                f"CGDHead expects a feature map (B, {self.in_channels}, H, W), got {tuple(feature_map.shape)}"
            )
        pooled = [pool(feature_map) for pool in self.poolings]
        embedding = self.norm(torch.cat([self.norm(fc(p)) for fc, p in zip(self.projections, pooled)], dim=-1))
        return embedding, pooled[0]

    def forward(self, feature_map: Tensor) -> Tensor:
        """Embedding (B, feature_dim), unit L2 norm: what gets exported."""
        return self._branches(feature_map)[0]

    def forward_train(self, feature_map: Tensor) -> tuple[Tensor, Tensor | None]:
        """(embedding, auxiliary logits (B, num_classes)); logits are None without `num_classes`."""
        embedding, first_pooled = self._branches(feature_map)
        logits = self.auxiliary(first_pooled) if self.auxiliary is not None else None
        return embedding, logits
