"""Embedding models as a sequence of small modules (backbone -> pooling/head -> whitening FC -> L2),
rebuilt from a tiny typed config saved beside the weights (sentence-transformers style).

The checkpoint is the hand-off to export/: `save_checkpoint` writes config, weights, preprocessing
spec and the embedding-space id; `load_checkpoint` rebuilds the model from them.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdk.preprocess import PreprocessSpec
from training.backbones import create_backbone
from training.checkpoint_io import read_tagged, save_atomic
from training.heads import CGDHead, L2Norm, Whitening
from training.pooling import build_pooling
from training.errors import TrainingError

CHECKPOINT_FORMAT = "retrieval-sdk/checkpoint"
CHECKPOINT_VERSION = 1
POOLINGS = ("gem", "spoc", "mac", "cgd")


class CheckpointError(TrainingError):
    """A checkpoint file is not one of ours or describes an architecture we cannot build."""


@dataclass(frozen=True)
class ModelConfig:
    """How to rebuild an embedding model. embedding_dim=None keeps the pooled dimension (no FC)."""

    backbone: str
    pooling: str = "gem"  # gem | spoc | mac | cgd
    embedding_dim: int | None = None
    gem_p: float = 3.0
    cgd_config: str = "SMG"
    input_size: int | None = None  # overrides the backbone's pretrained input size

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

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

    def __init__(self, config: ModelConfig, pretrained: bool | str | Path = False):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, pretrained=pretrained)
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

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone + pooling, before the whitening FC (used to fit the FC in closed form)."""
        return self.pool(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.whiten(self.pooled(x)))


def new_space_id(prefix: str = "space") -> str:
    """A fresh embedding-space id, shared by every model trained into the same space."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class CheckpointMeta:
    """What travels with the weights: the space id, the role and free-form training facts."""

    embedding_space: str
    role: str = "query"  # query | gallery
    name: str = ""
    extra: dict = field(default_factory=dict)


def save_checkpoint(model: EmbeddingModel, path: str | Path, meta: CheckpointMeta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "preprocess": model.spec.to_dict(),
        "embedding_dim": model.embedding_dim,
        "meta": asdict(meta),
        "state_dict": model.state_dict(),
    }
    return save_atomic(payload, path)


def load_checkpoint(path: str | Path) -> tuple[EmbeddingModel, CheckpointMeta]:
    """Rebuild the model from a checkpoint written by save_checkpoint, with clear errors otherwise."""
    path = Path(path)
    payload = read_tagged(
        path, CheckpointError, "retrieval-sdk checkpoint", CHECKPOINT_FORMAT,
        "train one with `retrieval-sdk quickstart` or save it with training.models.save_checkpoint",
    )
    try:
        config = ModelConfig.from_dict(payload["config"])
        model = EmbeddingModel(config, pretrained=False)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path} describes an architecture this version cannot build: {e}") from None
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match its own config ({first})") from None
    model.spec = PreprocessSpec.from_dict(payload["preprocess"])
    model.eval()
    return model, CheckpointMeta(**payload["meta"])
