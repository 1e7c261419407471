"""What every gallery extractor shares: its typed config, the backbone split at conv4/conv5, ArcFace
training, multi-scale extraction and the checkpoint file.

DELG, DOLG and CVNet all read a ResNet-style backbone twice: the stride-16 map ("conv4", ResNet
`layer3`) for local features and the stride-32 map ("conv5", `layer4`) for the global one. `Trunk`
takes both from timm's feature API (`feature_info` names the stages, `forward_intermediates` returns
them in one pass), so any CNN of the registry works (ResNet, EfficientNet, MobileNet families) and
tests and CPU runs use tiny variants of the same architectures.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdk.preprocess import PreprocessSpec
from training.backbones import Backbone, create_backbone
from training.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from training.config import Checked, Config, check_fields, from_dict
from training.errors import TrainingError

# kind -> the module (under training.extractors, imported when a kind is built) and class that builds it;
# mabnet: a `train mabnet` checkpoint (training/extractors/mabnet.py)
_CLASSES = {"delg": "delg:DELG", "dolg": "dolg:DOLG", "cvnet": "cvnet:CVNetGlobal", "rmac": "weak:RMACGlobal",
            "noise": "weak:GaussianNoise", "mabnet": "mabnet:MABNetExtractor"}
KINDS = tuple(_CLASSES)


class ExtractorError(TrainingError):
    """An extractor config, backbone or checkpoint that cannot be used."""


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ExtractorTrainConfig(Checked):
    """ArcFace training of one extractor on a labelled set (the paper recipes, shortened for CPU)."""

    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0  # pretrained backbones usually move slower than the new heads
    freeze_stem: bool = False  # keep everything below conv4 fixed (and skip its backward pass)
    weight_decay: float = 1e-4
    arcface_s: float = 30.0
    arcface_m: float = 0.15
    recon_weight: float = 10.0  # DELG: autoencoder reconstruction loss weight (lambda in the paper)
    attention_weight: float = 1.0  # DELG: attention classification loss weight (beta in the paper)
    augment: bool = True
    max_steps: int | None = None  # stop early (tests / smoke runs)
    seed: int = 0
    _where, _error = "extractor train", ExtractorError
    _checks = {"epochs backbone_lr_scale": ">= 0", "batch_size": ">= 2", "lr": "> 0"}


@dataclass(frozen=True)
class ExtractorConfig(Config):
    """One gallery feature extractor. `kind` picks the architecture; `name` names its feature.

    Field meanings by kind:
    - all: backbone (registry name: resnet50/101, efficientnet_lite*, mobilenetv2_100, tiny_*), pretrained
      (False | True for shipped weights | a file), image_size, dim (global descriptor dim), gem_p,
      scales (multi-scale extraction: descriptors of the rescaled images are summed, then L2-normalised).
    - delg: local_dim (autoencoder bottleneck, 128 in the paper), num_local (top-k local features kept
      per image by attention score; 0 = global only), attention_hidden (512 in the paper).
    - dolg: local_dim (local branch width, 1024 in the paper), dilations (multi-atrous rates; scale them
      to the conv4 map size), multi_atrous (False reproduces the released PyTorch port).
    - cvnet: global only; scales default to (0.7071, 1, 1.4142) as in CVNet's extraction.
    - rmac, noise: weak / pure-noise features for robustness studies (training/extractors/weak.py).
    `weights` loads a released checkpoint (see training.extractors.released) instead of training.
    """

    kind: str
    name: str = ""
    backbone: str = "resnet50"
    pretrained: bool | str = False
    image_size: int | None = None
    dim: int = 2048
    gem_p: float = 3.0
    scales: tuple[float, ...] | None = None  # None: (0.7071, 1, 1.4142) for cvnet, (1,) otherwise
    local_dim: int = 128
    num_local: int = 0
    attention_hidden: int = 512
    dilations: tuple[int, ...] = (6, 12, 18)
    multi_atrous: bool = True
    weights: str | None = None
    train: ExtractorTrainConfig = field(default_factory=ExtractorTrainConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name or self.kind)
        check_fields(self, {"kind": KINDS, "dim local_dim attention_hidden": ">= 1", "num_local": ">= 0"},
                     f"extractor {self.name}", ExtractorError)
        if self.scales is None:
            object.__setattr__(self, "scales", (0.7071, 1.0, 1.4142) if self.kind == "cvnet" else (1.0,))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", from_dict(ExtractorTrainConfig, self.train, f"extractor {self.name}.train"))
        if not self.scales or min(self.scales) <= 0:
            raise ExtractorError(f"extractor {self.name}: scales must be positive numbers, got {self.scales}")
        if self.kind == "mabnet" and (self.train.epochs or not self.weights):
            raise ExtractorError(f"extractor {self.name}: a mabnet extractor is trained by `retrieval-sdk train mabnet`; "
                                 "set weights to its mabnet.safetensors and train.epochs to 0")
        if self.kind != "delg" and self.num_local:
            raise ExtractorError(f"extractor {self.name}: only DELG produces local features (num_local), not {self.kind}")

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractorConfig":
        return from_dict(cls, d, f"extractor {d.get('name') or d.get('kind', '?')}" if isinstance(d, dict) else "extractor")


# ------------------------------------------------------------------------------------------ trunk


class Trunk(nn.Module):
    """A registry backbone read at two depths: conv4 (its last stride-16 stage in timm's `feature_info`)
    and conv5 (the final stride-32 map, the backbone's usual output), both from `forward_intermediates`.

    The backbone module is kept whole (state-dict keys `backbone.model.*` as in a plain Backbone). The
    stem (every parameter up to the conv4 stage, in registration order) can be frozen: no gradients,
    BatchNorm statistics fixed, and autograd skips its backward pass.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        infos = list(backbone.model.feature_info)
        reductions = [int(d["reduction"]) for d in infos]
        if 16 not in reductions or reductions[-1] != 32:
            raise ExtractorError(
                f"backbone '{backbone.name}' has no stride-16 and stride-32 stages (feature_info reductions "
                f"{reductions}): it is not a ResNet/EfficientNet/MobileNet-style CNN; DELG/DOLG/CVNet need conv4 "
                "and conv5 feature maps (try resnet50, resnet101, efficientnet_lite0, mobilenetv2_100, tiny_resnet)"
            )
        self.c4_index = max(i for i, r in enumerate(reductions) if r == 16)
        self.conv4_channels: int = int(infos[self.c4_index]["num_chs"])
        self.conv5_channels: int = int(backbone.num_features)
        names = [n for n, _ in backbone.model.named_parameters()]
        prefix = infos[self.c4_index]["module"] + "."
        self._stem = set(names[: max(i for i, n in enumerate(names) if n.startswith(prefix)) + 1])
        self.freeze_stem = False

    def stem_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.backbone.model.named_parameters() if n in self._stem]

    def tail_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.backbone.model.named_parameters() if n not in self._stem]

    def set_freeze_stem(self, frozen: bool) -> "Trunk":
        """Keep the layers below conv4 fixed: no gradients, BatchNorm statistics frozen (eval mode); returns self."""
        self.freeze_stem = frozen
        for p in self.stem_parameters():
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Trunk":
        super().train(mode)
        if self.freeze_stem:
            for name, module in self.backbone.model.named_modules():
                own = [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
                if own and all(n in self._stem for n in own):
                    module.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conv4 map (B, C4, H/16, W/16), conv5 map (B, C5, H/32, W/32))."""
        c5, (c4,) = self.backbone.model.forward_intermediates(x, indices=[self.c4_index], norm=False)
        return c4, c5


# ------------------------------------------------------------------------------------------ extractor


class Extracted(NamedTuple):
    """One batch of gallery features. Global: (B, D) unit norm. Local (DELG): (B, K, Dl) unit-norm
    descriptors sorted by attention score (B, K), the first `local_count[b]` of each row valid."""

    global_: Tensor
    local: Tensor | None = None
    local_scores: Tensor | None = None
    local_count: Tensor | None = None


class GalleryExtractor(nn.Module):
    """Base of DELG, DOLG and CVNet: a Trunk, a global head (`embed`), an ArcFace classifier for training.

    Subclasses define `embed(x) -> (B, dim)` (before L2) and may override `train_losses` (extra terms)
    and `extract` (local features).
    """

    def __init__(self, config: ExtractorConfig, num_classes: int | None = None):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.trunk = Trunk(create_backbone(config.backbone, pretrained=config.pretrained))
        self.weights_source = self.trunk.backbone.weights_source
        spec = self.trunk.backbone.spec
        self.spec: PreprocessSpec = spec.with_size(config.image_size) if config.image_size else spec
        self.arcface = None  # set by subclasses once the descriptor dim is known

    module_type = "gallery_extractor"

    def module_config(self) -> dict:
        return {"config": self.config.to_dict(), "num_classes": self.num_classes}

    @classmethod
    def from_config(cls, config: dict) -> "GalleryExtractor":
        """Rebuild from `module_config()`; the backbone's pretrained weights come with the state dict."""
        if config.get("mabnet") is not None:  # a MABNet wrapped as an extractor: rebuilt from its own config
            from training.extractors.mabnet import MABNetExtractor

            return MABNetExtractor.from_saved(config)
        ec = ExtractorConfig.from_dict(config["config"])
        extractor = build_extractor(replace(ec, pretrained=False, weights=None), config["num_classes"])
        extractor.config = ec
        return extractor

    # -- shapes
    @property
    def global_dim(self) -> int:
        return self.config.dim

    embedding_dim = global_dim  # what the module format and export call it

    @property
    def name(self) -> str:
        return self.config.name

    local_dim = num_local = 0  # global only; DELG's local features override both

    def _make_arcface(self) -> None:
        from training.losses import ArcFace

        if self.num_classes is not None:
            if self.num_classes < 2:
                raise ExtractorError(f"extractor {self.name}: ArcFace training needs >= 2 classes, got {self.num_classes}")
            t = self.config.train
            self.arcface = ArcFace(self.global_dim, self.num_classes, s=t.arcface_s, m=t.arcface_m)

    # -- training
    def embed(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_losses(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Named loss terms for one batch; their weighted sum is what gets minimised."""
        if self.arcface is None:
            raise ExtractorError(f"extractor {self.name} was built without num_classes: it cannot be trained")
        return {"arcface": self.arcface(self.embed(x), labels)}

    def loss_weights(self) -> dict[str, float]:
        return {"arcface": 1.0}

    # -- extraction
    def _rescaled(self, x: Tensor, scale: float) -> Tensor:
        if scale == 1.0:
            return x
        h, w = (int(n) for n in x.shape[-2:])  # plain ints also under ONNX tracing (a fixed-size graph)
        size = (max(32, round(h * scale)), max(32, round(w * scale)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def global_descriptor(self, x: Tensor) -> Tensor:
        """Multi-scale global descriptor: sum over scales of the L2-normalised embedding, L2-normalised."""
        total = None
        for s in self.config.scales:
            e = F.normalize(self.embed(self._rescaled(x, s)), dim=-1)
            total = e if total is None else total + e
        return F.normalize(total, dim=-1)

    @torch.no_grad()
    def extract(self, x: Tensor) -> Extracted:
        return Extracted(self.global_descriptor(x))

    def forward(self, x: Tensor) -> Tensor:
        """The global descriptor (B, dim), unit norm: what a plain embedding model would return."""
        return self.global_descriptor(x)


# ------------------------------------------------------------------------------------------ checkpoints


def build_extractor(config: ExtractorConfig | dict, num_classes: int | None = None) -> GalleryExtractor:
    """The extractor for `config.kind`; with `num_classes`, it carries an ArcFace head for training."""
    if isinstance(config, dict):
        config = ExtractorConfig.from_dict(config)
    module, name = _CLASSES[config.kind].split(":")
    return getattr(importlib.import_module(f"training.extractors.{module}"), name)(config, num_classes)


def save_extractor(extractor: GalleryExtractor, path: str | Path, fingerprint: str = "", extra: dict | None = None) -> Path:
    """Write config + weights (+ the training fingerprint used to decide whether to retrain)."""
    meta = CheckpointMeta(role="extractor", name=extractor.name, extra={"fingerprint": fingerprint, **(extra or {})})
    return save_checkpoint(extractor, path, meta)


def load_extractor(path: str | Path) -> GalleryExtractor:
    """Rebuild an extractor saved by `save_extractor` (eval mode)."""
    extractor, _ = load_checkpoint(path, expect="gallery_extractor")
    extractor.weights_source = f"checkpoint {path}"
    return extractor
