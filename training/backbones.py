"""One front door to feature extractors: `create_backbone(name, pretrained=...)`.

A registry of named architectures (timm underneath) whose preprocessing spec travels with the name,
like timm's pretrained configs. Every backbone returns a feature map (B, C, h, w), ViTs included
(patch tokens reshaped), so pooling heads work the same on all of them.
"""

from __future__ import annotations

from training import _torchvision_compat  # noqa: F401  (installs the torchvision shim before timm)

from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from sdk.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from training import shufflenet as _shufflenet  # noqa: F401,E402  (registers ShuffleNetV2 with timm)
from training.weights import load_pretrained
from training.errors import TrainingError

INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneConfig:
    """A named architecture: the timm model behind it and the input it was pretrained on."""

    timm_name: str
    spec: PreprocessSpec
    kind: str = "cnn"  # "cnn" or "vit"
    timm_kwargs: dict = field(default_factory=dict)
    description: str = ""


def _spec(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic") -> PreprocessSpec:
    return PreprocessSpec(input_size=(size, size), mean=mean, std=std, interpolation=interpolation)


BACKBONES: dict[str, BackboneConfig] = {
    "mobilenetv2_100": BackboneConfig("mobilenetv2_100", _spec(224), description="MobileNetV2 1.0, query model"),
    "shufflenet_v2_x1_0": BackboneConfig(
        "shufflenet_v2_x1_0", _spec(224, interpolation="bilinear"),
        description="ShuffleNetV2 1.0, query model (random init: no offline weights)",
    ),
    "resnet34": BackboneConfig("resnet34", _spec(224), description="ResNet-34, query model"),
    "resnet50": BackboneConfig("resnet50", _spec(224), description="ResNet-50, gallery model"),
    "resnet101": BackboneConfig("resnet101", _spec(224), description="ResNet-101, gallery model (DELG/DOLG/CVNet)"),
    # EfficientNet-Lite: the shipped checkpoints use symmetric padding, BN eps 1e-3 (efficientnet_pytorch style).
    **{
        f"efficientnet_lite{i}": BackboneConfig(
            f"efficientnet_lite{i}", _spec(size), timm_kwargs={"bn_eps": 1e-3},
            description=f"EfficientNet-Lite{i}, mobile-friendly",
        )
        for i, size in enumerate((224, 240, 260))
    },
    "vit_small_patch16_224": BackboneConfig(
        "vit_small_patch16_224", _spec(224, INCEPTION_MEAN, INCEPTION_STD), kind="vit",
        timm_kwargs={"dynamic_img_size": True}, description="ViT-S/16, MABNet gallery model",
    ),
    # Tiny random-init configs for tests and CPU smoke runs (timm's test_* models, < 0.4M params).
    "tiny_resnet": BackboneConfig("test_resnet", _spec(64, interpolation="bilinear"), description="tests"),
    "tiny_efficientnet": BackboneConfig("test_efficientnet", _spec(64, interpolation="bilinear"), description="tests"),
    "tiny_vit": BackboneConfig(
        "test_vit", _spec(64, INCEPTION_MEAN, INCEPTION_STD, "bilinear"), kind="vit",
        timm_kwargs={"dynamic_img_size": True}, description="tests",
    ),
}


class Backbone(nn.Module):
    """A timm model seen as a feature-map extractor: forward(x) -> (B, num_features, h, w)."""

    def __init__(self, name: str, config: BackboneConfig, model: nn.Module):
        super().__init__()
        self.name, self.config, self.model = name, config, model
        self.num_features: int = model.num_features
        self.spec: PreprocessSpec = config.spec  # the pretrained config: input size, mean/std, resize rule
        self.weights_source = "random init"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if self.config.kind == "vit":
            return self.tokens_to_map(feats, x.shape[-2:])
        return feats

    def tokens_to_map(self, tokens: torch.Tensor, image_hw) -> torch.Tensor:
        """Drop prefix (class/register) tokens and fold patch tokens back into a (B, C, h, w) map."""
        patch_h, patch_w = self.model.patch_embed.patch_size
        h, w = image_hw[0] // patch_h, image_hw[1] // patch_w
        patches = tokens[:, self.model.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], h, w)


class UnknownBackboneError(TrainingError):
    pass


def create_backbone(name: str, pretrained: bool | str | Path = False) -> Backbone:
    """Build backbone `name`; `pretrained` is False, True (shipped package, then hub) or a local file path.

    The returned module's `.spec` is its pretrained preprocessing config and `.weights_source`
    says where the weights came from.
    """
    if name not in BACKBONES:
        raise UnknownBackboneError(
            f"unknown backbone '{name}'; choose one of: {', '.join(BACKBONES)}"
        )
    cfg = BACKBONES[name]
    kwargs = dict(num_classes=0, **cfg.timm_kwargs)
    if cfg.kind == "cnn":
        kwargs["global_pool"] = ""
    model = timm.create_model(cfg.timm_name, pretrained=False, **kwargs)

    def from_hub() -> dict[str, torch.Tensor]:
        return timm.create_model(cfg.timm_name, pretrained=True, **kwargs).state_dict()

    backbone = Backbone(name, cfg, model)
    backbone.weights_source = load_pretrained(model, name, pretrained, from_hub)
    return backbone


def list_backbones() -> list[str]:
    return list(BACKBONES)
