"""Embedding models as a sequence of small modules (backbone -> pooling/head -> whitening FC -> L2),
rebuilt from a tiny typed config saved beside the weights (sentence-transformers style).

The checkpoint is the hand-off to export/: `save_checkpoint` / `load_checkpoint` (training/checkpoint.py,
re-exported here) write and read config, weights, preprocessing spec and the embedding-space id.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sdk.preprocess import PreprocessSpec
from training.backbones import create_backbone
from training.config import Checked
from training.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint  # noqa: F401
from training.heads import CGDHead, L2Norm, Whitening
from training.pooling import build_pooling

POOLINGS = ("gem", "spoc", "mac", "cgd")


@dataclass(frozen=True)
class ModelConfig(Checked):
    """How to rebuild an embedding model. embedding_dim=None keeps the pooled dimension (no FC)."""

    backbone: str
    pooling: str = "gem"  # gem | spoc | mac | cgd
    embedding_dim: int | None = None
    gem_p: float = 3.0
    cgd_config: str = "SMG"
    input_size: int | None = None  # overrides the backbone's pretrained input size
    last_stride: int = 2  # 1: the backbone's last downsampling removed (CGD), a 2x larger final map
    _checks = {"pooling": POOLINGS}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise CheckpointError(f"unknown model config keys {sorted(unknown)}: checkpoint from a newer version?")
        return cls(**d)


class EmbeddingModel(nn.Module):
    """image batch (B,3,H,W) -> L2-normalised float32 embeddings (B, D); any H, W."""

    module_type = "embedding_model"

    def __init__(self, config: ModelConfig, pretrained: bool | str | Path = False):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, pretrained=pretrained, last_stride=config.last_stride)
        channels = self.backbone.num_features
        if config.pooling == "cgd":
            self.pool = CGDHead(channels, gd_config=config.cgd_config, feature_dim=config.embedding_dim or channels,
                                gem_p=config.gem_p)
            self.whiten = nn.Identity()
        else:
            kw = {"p": config.gem_p} if config.pooling == "gem" else {}
            self.pool = build_pooling(config.pooling, **kw)
            self.whiten = Whitening(channels, config.embedding_dim) if config.embedding_dim else nn.Identity()
        self.norm = L2Norm()
        self.embedding_dim = config.embedding_dim or channels
        spec = self.backbone.spec
        self.spec: PreprocessSpec = spec.with_size(config.input_size) if config.input_size else spec

    def module_config(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def from_config(cls, config: dict) -> "EmbeddingModel":
        return cls(ModelConfig.from_dict(config), pretrained=False)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone + pooling, before the whitening FC (used to fit the FC in closed form)."""
        return self.pool(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.whiten(self.pooled(x)))


def new_space_id(prefix: str = "space") -> str:
    """A fresh embedding-space id, shared by every model trained into the same space."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
