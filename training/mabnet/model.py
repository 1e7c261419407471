"""MABNet's networks (Gao et al., "Master-Assistant Buddy Network"): two blocks of one architecture with
separate weights, the weight transfer between them, and the gallery descriptor over a fixed crop layout.

A block is a registry backbone -> GeM (on a ViT: over the patch tokens, the class token dropped) -> FC.
`MABNet` holds the master and (unless trained master-only) the assistant; its forward is the gallery
descriptor: the master's L2-normalised embeddings of the image and of its fixed global and local crops,
concatenated and L2-normalised (mode "master"), or that and the assistant's the same way (mode
"combined", MABNet(C)). The crops are cut and resized inside the graph, so the ONNX export, a teacher for
distillation and an AFF gallery feature all compute the same descriptor from one SDK-preprocessed image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdk.preprocess import PreprocessSpec
from training.backbones import create_backbone
from training.config import Checked
from training.errors import TrainingError
from training.losses import BoundedArcFace
from training.pooling import GeM

MODES = ("master", "combined")


class MABNetError(TrainingError):
    """A MABNet config, checkpoint or input that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class GalleryLayout(Checked):
    """The fixed crops the gallery descriptor concatenates after the original image. Global crops are squares
    of `global_side` (a fraction of the image side) spread evenly along the main diagonal (one: centred) and
    resized to the input size; local crops are squares of `local_side` centred on the cells of the smallest
    square grid with `n_local` cells (row-major, first n), kept inside the image, resized to `local_size` px.
    n_global = n_local = 0 is the original-only mode."""

    n_global: int = 2
    n_local: int = 8
    global_side: float = 0.8
    local_side: float = 0.5
    local_size: int = 96
    _where, _error = "model.gallery", MABNetError
    _checks = {"n_global n_local": ">= 0", "global_side local_side": "(0, 1]", "local_size": ">= 16"}

    @property
    def views(self) -> int:
        """Embeddings concatenated per block: the original + every crop."""
        return 1 + self.n_global + self.n_local


def gallery_boxes(layout: GalleryLayout) -> tuple[list[tuple[float, float, float]], list[tuple[float, float, float]]]:
    """(global boxes, local boxes) as (top, left, side) fractions of the image: the documented fixed layout."""
    def diagonal(n: int, side: float) -> list[tuple[float, float, float]]:
        room = 1.0 - side
        return [(room * t, room * t, side) for t in ([0.5] if n == 1 else [i / (n - 1) for i in range(n)])]

    grid = math.ceil(math.sqrt(layout.n_local)) if layout.n_local else 0
    locals_ = []
    for i in range(layout.n_local):
        r, c = divmod(i, grid)
        centre = [(k + 0.5) / grid for k in (r, c)]
        top, left = (min(max(x - layout.local_side / 2, 0.0), 1.0 - layout.local_side) for x in centre)
        locals_.append((top, left, layout.local_side))
    return diagonal(layout.n_global, layout.global_side) if layout.n_global else [], locals_


def crop_resize(x: Tensor, box: tuple[float, float, float], size: tuple[int, int]) -> Tensor:
    """The (top, left, side) box of a batch (B, C, H, W), resized (bilinear) to `size`; integer pixel bounds
    from the static H, W, so the exported graph is a fixed slice."""
    h, w = (int(n) for n in x.shape[-2:])
    top, left, side = box
    ch, cw = max(1, round(side * h)), max(1, round(side * w))
    t, l = min(round(top * h), h - ch), min(round(left * w), w - cw)
    return F.interpolate(x[:, :, t:t + ch, l:l + cw], size=size, mode="bilinear", align_corners=False)


class Block(nn.Module):
    """backbone -> GeM -> FC: one MABNet block's embedding (before L2)."""

    def __init__(self, backbone: str, pretrained: bool | str, dim: int, gem_p: float):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained)
        self.pool = GeM(p=gem_p, learnable=True)
        self.fc = nn.Linear(self.backbone.num_features, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.backbone(x)))


@dataclass(frozen=True)
class MABNetModelConfig(Checked):
    """How to rebuild a MABNet: the block architecture, whether it has an assistant, the gallery layout and
    which descriptor forward returns."""

    backbone: str = "vit_small_patch16_224"
    pretrained: bool | str = True
    image_size: int | None = None  # None: the backbone's pretrained input size (224 for ViT-S/16)
    dim: int = 512
    gem_p: float = 3.0
    assistant: bool = True  # False: the master-only ablation
    mode: str = "master"  # master | combined (MABNet(C), needs the assistant)
    gallery: GalleryLayout = field(default_factory=GalleryLayout)
    _where, _error = "model", MABNetError
    _checks = {"mode": MODES, "dim": ">= 1"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.gallery, dict):
            object.__setattr__(self, "gallery", GalleryLayout(**self.gallery))
        if self.mode == "combined" and not self.assistant:
            raise MABNetError("mode 'combined' (MABNet(C)) concatenates the assistant, but this model has none")


def descriptor(block: Block, x: Tensor, layout: GalleryLayout) -> Tensor:
    """One block's gallery descriptor: the L2-normalised embeddings of the original and its crops, concatenated
    (original, globals, locals) and L2-normalised. Same-size views share one backbone pass."""
    size = tuple(int(n) for n in x.shape[-2:])
    boxes_g, boxes_l = gallery_boxes(layout)
    b = x.shape[0]

    def per_image(views: list[Tensor]) -> Tensor:  # k views of the batch in one pass -> (B, k * D), view-major
        e = F.normalize(block(torch.cat(views)), dim=-1)
        return e.reshape(len(views), b, -1).transpose(0, 1).reshape(b, -1)  # reshape, not split: a dynamic batch
    parts = [per_image([x] + [crop_resize(x, box, size) for box in boxes_g])]
    if boxes_l:
        parts.append(per_image([crop_resize(x, box, (layout.local_size,) * 2) for box in boxes_l]))
    return F.normalize(torch.cat(parts, dim=1), dim=-1)


class MABNet(nn.Module):
    """The master and assistant blocks; forward(x) is the gallery descriptor (see the module docstring).

    For training, `set_classes(n)` adds one bounded ArcFace head per block (`set_classes(None)` removes
    them: a saved model is the descriptor alone)."""

    module_type = "mabnet"
    dynamic_hw = False  # the crops are fixed slices of the trace size

    def __init__(self, config: MABNetModelConfig):
        super().__init__()
        self.config = config
        self.master = Block(config.backbone, config.pretrained, config.dim, config.gem_p)
        self.assistant = Block(config.backbone, config.pretrained, config.dim, config.gem_p) if config.assistant else None
        if self.assistant is not None:  # one start for both (the new GeM/FC too), so that averaging their weights
            self.assistant.load_state_dict(self.master.state_dict())  # is meaningful; crops and heads differ
        self.master_arcface: BoundedArcFace | None = None
        self.assistant_arcface: BoundedArcFace | None = None
        spec = self.master.backbone.spec
        self.spec: PreprocessSpec = spec.with_size(config.image_size) if config.image_size else spec
        self.weights_source = self.master.backbone.weights_source

    @property
    def backbone(self):
        """The master's backbone (the exporter reads its kind: a ViT gets its positional embedding baked)."""
        return self.master.backbone

    @property
    def blocks(self) -> list[Block]:
        """The master, then the assistant when there is one."""
        return [self.master] + ([self.assistant] if self.assistant is not None else [])

    @property
    def embedding_dim(self) -> int:
        per_block = self.config.gallery.views * self.config.dim
        return per_block * (2 if self.config.mode == "combined" else 1)

    @property
    def num_classes(self) -> int | None:
        return None if self.master_arcface is None else self.master_arcface.num_classes

    def with_view(self, mode: str | None = None, gallery: GalleryLayout | None = None) -> "MABNet":
        """The same weights read another way (mode, crop layout): changes this module's config in place."""
        self.config = replace(self.config, mode=mode or self.config.mode, gallery=gallery or self.config.gallery)
        return self

    def set_classes(self, n: int | None, s: float = 30.0, m: float = 0.3, s_bounds=(8.0, 64.0),
                    m_bounds=(0.05, 0.6)) -> None:
        """Attach fresh bounded ArcFace heads for `n` classes (training), or remove them (None)."""
        if n is None:
            self.master_arcface = self.assistant_arcface = None
            return
        self.master_arcface = BoundedArcFace(self.config.dim, n, s, m, s_bounds, m_bounds)
        if self.assistant is not None:
            self.assistant_arcface = BoundedArcFace(self.config.dim, n, s, m, s_bounds, m_bounds)

    def module_config(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: dict) -> "MABNet":
        return cls(MABNetModelConfig(**{**config, "pretrained": False}))

    def forward(self, x: Tensor) -> Tensor:
        layout = self.config.gallery
        master = descriptor(self.master, x, layout)
        if self.config.mode == "master":
            return master
        return F.normalize(torch.cat([master, descriptor(self.assistant, x, layout)], dim=1), dim=-1)


# ------------------------------------------------------------------------------------------------ transfer


@torch.no_grad()
def transfer_weights(target: Block, source: Block, lam: float) -> None:
    """theta_target <- lam * theta_target + (1 - lam) * theta_source over every floating tensor of the block
    (parameters and BatchNorm statistics; integer counters are left as they are)."""
    if not 0.0 <= lam <= 1.0:
        raise MABNetError(f"transfer lambda must be in [0, 1], got {lam}")
    src = source.state_dict()
    for name, t in target.state_dict().items():
        if t.is_floating_point():
            t.mul_(lam).add_(src[name].to(t.dtype), alpha=1.0 - lam)


def load_mabnet(path: str | Path) -> MABNet:
    """A MABNet saved by `retrieval-sdk train mabnet` (eval mode)."""
    from training.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path, expect="mabnet")
    return model
