"""Fusion of several gallery features into one embedding (AFF: Wu et al., "Asymmetric Feature Fusion for
Image Retrieval", CVPR 2023), and the two baselines it is compared with.

- `DynamicMixer`: each feature goes through its own FC to a common width d (a local feature set becomes
  one token per descriptor, all sharing that feature's FC); a learnable source embedding tells the tokens
  apart; a learnable fusion token is prepended and L pre-norm transformer layers (multi-head
  self-attention + MLP, each with LayerNorm and a residual) mix everything; the final fusion token,
  layer-normalised and projected, is the L2-normalised gallery embedding.
- `ConcatMLP`: concatenated L2-normalised global features -> MLP -> L2 (the learned-fusion baseline).
- `FeatureTokens`: the per-feature FC + source embedding every token fusion starts from (the mixer here,
  the LAFF-style and DOLG-style orthogonal variants in training/aff/fusions.py).
- `ensemble`: concatenated L2-normalised global features / sqrt(n) (the training-free baseline).

Inputs are dicts keyed by feature name: global features (B, D); a local set "<name>:local" (B, K, Dl)
with a boolean "<name>:mask" (B, K) marking valid descriptors. Shapes are checked with clear errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from training.config import Config
from training.errors import TrainingError


class MixerInputError(TrainingError):
    """Features that do not fit the mixer: missing names, wrong dims, mismatched batch sizes."""


@dataclass(frozen=True)
class FeatureSpec:
    """One mixer input: a global descriptor (tokens=1) or a local set of up to `tokens` descriptors."""

    name: str
    dim: int
    local: bool = False
    tokens: int = 1

    @property
    def key(self) -> str:
        return f"{self.name}:local" if self.local else self.name


def local_key(name: str) -> str:
    return f"{name}:local"


def mask_key(name: str) -> str:
    return f"{name}:mask"


def check_inputs(specs: Sequence[FeatureSpec], inputs: Mapping[str, Tensor]) -> int:
    """Batch size of `inputs` after checking every spec is present with the right shape."""
    batch = None
    for spec in specs:
        if spec.key not in inputs:
            have = ", ".join(sorted(k for k in inputs if not k.endswith(":mask"))) or "nothing"
            raise MixerInputError(f"the mixer expects feature '{spec.key}' but got {have}")
        x = inputs[spec.key]
        want = (spec.tokens, spec.dim) if spec.local else (spec.dim,)
        if tuple(x.shape[1:]) != want:
            raise MixerInputError(
                f"feature '{spec.key}' has shape {tuple(x.shape)}; the mixer was built for (batch, "
                f"{', '.join(map(str, want))}): features from another extractor or config?"
            )
        if batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise MixerInputError(
                f"feature '{spec.key}' has {x.shape[0]} rows but '{specs[0].key}' has {batch}: "
                "every feature must describe the same images"
            )
    if batch is None:
        raise MixerInputError("the mixer has no input features")
    return batch


class Block(nn.Module):
    """Pre-norm transformer layer: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad_mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class MixerArch(Config):
    """What rebuilds a mixer: its inputs and sizes (saved in the gallery checkpoint)."""

    inputs: tuple[FeatureSpec, ...]
    kind: str = "transformer"  # one of FUSION_KINDS
    dim: int = 256
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    embedding_dim: int = 256
    token_dropout: float = 0.0
    _where = "mixer"  # what from_dict's errors name


class FeatureTokens(nn.Module):
    """What every token fusion shares: each feature L2-normalised, through its own FC to width `dim`, plus a
    learnable source embedding; a local set gives one token per descriptor (sharing its feature's FC).
    Token dropout (training only) drops whole features at random, never every feature of an image."""

    def __init__(self, arch: MixerArch):
        super().__init__()
        if not arch.inputs:
            raise MixerInputError("the mixer needs at least one input feature")
        if arch.dim % arch.heads:
            raise MixerInputError(f"mixer dim {arch.dim} must be a multiple of heads {arch.heads}")
        self.arch = arch
        self.specs = tuple(arch.inputs)
        self.proj = nn.ModuleDict({_module_key(s): nn.Linear(s.dim, arch.dim) for s in self.specs})
        self.source = nn.Parameter(torch.zeros(len(self.specs), arch.dim))

    @property
    def embedding_dim(self) -> int:
        return self.arch.embedding_dim

    def feature_tokens(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, T, d) tokens of every feature, in spec order, and their (B, T) padding mask (True = ignore)."""
        batch = check_inputs(self.specs, inputs)
        parts, pads, dropped = [], [], []
        drop = self.training and self.arch.token_dropout > 0
        for i, spec in enumerate(self.specs):
            x = F.normalize(inputs[spec.key].float(), dim=-1)
            tok = self.proj[_module_key(spec)](x) + self.source[i]
            if spec.local:
                mask = inputs.get(mask_key(spec.name))
                pad = ~mask.bool() if mask is not None else torch.zeros(tok.shape[:2], dtype=torch.bool)
            else:
                tok, pad = tok[:, None], torch.zeros(batch, 1, dtype=torch.bool)
            dropped.append(torch.rand(batch, 1) < self.arch.token_dropout if drop else torch.zeros(batch, 1, dtype=torch.bool))
            parts.append(tok)
            pads.append(pad.to(tok.device))
        every = torch.cat(dropped, 1).all(1, keepdim=True)  # an image keeps all its features rather than none
        pads = [pad | (d & ~every).to(pad.device) for pad, d in zip(pads, dropped)]
        return torch.cat(parts, 1), torch.cat(pads, 1)


class DynamicMixer(FeatureTokens):
    """Features -> per-feature FC -> [fusion token; tokens] -> L transformer layers -> fusion token -> L2."""

    def __init__(self, arch: MixerArch):
        super().__init__(arch)
        self.fusion_token = nn.Parameter(torch.zeros(1, 1, arch.dim))
        nn.init.trunc_normal_(self.source, std=0.02)
        nn.init.trunc_normal_(self.fusion_token, std=0.02)
        self.blocks = nn.ModuleList(Block(arch.dim, arch.heads, arch.mlp_ratio, arch.dropout) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(arch.dim)
        self.head = nn.Linear(arch.dim, arch.embedding_dim)

    def tokens(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, 1 + T, d) token sequence and its (B, 1 + T) padding mask (True = ignore)."""
        tok, pad = self.feature_tokens(inputs)
        batch = tok.shape[0]
        return (torch.cat([self.fusion_token.expand(batch, -1, -1), tok], 1),
                torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=pad.device), pad], 1))

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        x, pad = self.tokens(inputs)
        for block in self.blocks:
            x = block(x, pad)
        return F.normalize(self.head(self.norm(x[:, 0])), dim=-1)


class ConcatMLP(nn.Module):
    """Baseline: concatenated L2-normalised global features -> Linear -> BN -> ReLU -> Linear -> L2."""

    def __init__(self, arch: MixerArch):
        super().__init__()
        self.arch = arch
        self.specs = tuple(s for s in arch.inputs if not s.local)
        if not self.specs:
            raise MixerInputError("the concat+MLP baseline needs at least one global feature")
        total = sum(s.dim for s in self.specs)
        hidden = max(arch.dim, arch.embedding_dim)
        self.mlp = nn.Sequential(nn.Linear(total, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(arch.dropout),
                                 nn.Linear(hidden, arch.embedding_dim))

    @property
    def embedding_dim(self) -> int:
        return self.arch.embedding_dim

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        check_inputs(self.specs, inputs)
        x = torch.cat([F.normalize(inputs[s.key].float(), dim=-1) for s in self.specs], dim=-1)
        return F.normalize(self.mlp(x), dim=-1)


FUSION_KINDS = ("transformer", "concat_mlp", "laff", "orthogonal")


def build_mixer(arch: MixerArch) -> nn.Module:
    """The fusion module of `arch.kind`: the dynamic mixer, concat+MLP, or a variant of training/aff/fusions.py."""
    if arch.kind == "transformer":
        return DynamicMixer(arch)
    if arch.kind == "concat_mlp":
        return ConcatMLP(arch)
    if arch.kind in ("laff", "orthogonal"):
        from training.aff.fusions import LAFFFusion, OrthogonalFusion

        return (LAFFFusion if arch.kind == "laff" else OrthogonalFusion)(arch)
    raise MixerInputError(f"mixer kind must be one of {FUSION_KINDS}, got {arch.kind!r}")


def ensemble(globals_: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate L2-normalised (N, D_i) global features, scaled by 1/sqrt(n): unit norm, equal weights."""
    if not globals_:
        raise MixerInputError("the ensemble needs at least one feature")
    n = {len(g) for g in globals_}
    if len(n) != 1:
        raise MixerInputError(f"features to ensemble have different counts {sorted(n)}: they must describe the same images")
    parts = [g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12) for g in globals_]
    return (np.concatenate(parts, axis=1) / math.sqrt(len(parts))).astype(np.float32)


def _module_key(spec: FeatureSpec) -> str:
    return spec.key.replace(":", "_").replace(".", "_")
