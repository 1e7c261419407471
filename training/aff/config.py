"""Typed configuration of the AFF pipeline, read from a JSON or YAML file with dotted overrides.

    cfg = load_config("configs/aff_small.json", overrides=["train.epochs=1", "extractors.0.train.epochs=1"])

The dataclass defaults are the small CPU config (configs/aff_small.json spells them out). Unknown keys
and impossible values are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.config import Checked, ConfigError, DataConfig, RunConfig, check_known, load_config_file
from training.aff.mixer import FUSION_KINDS
from training.extractors.base import ExtractorConfig, ExtractorTrainConfig

ABLATION_CHANGES = {"shared": {"classifier": "shared"}, "two_stage": {"schedule": "two_stage"}}  # to the JointConfig
ABLATIONS = tuple(ABLATION_CHANGES)
FUSION_VARIANTS = tuple(k for k in FUSION_KINDS if k != "transformer")


@dataclass(frozen=True)
class MixerConfig(Checked):
    """The dynamic mixer: common width `dim`, `depth` transformer layers of `heads` heads."""

    dim: int = 256
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    token_dropout: float = 0.1  # drop whole features at random in training (robust fusion)
    use_local: bool = True  # feed DELG's local descriptors as extra tokens
    _where = "mixer"
    _checks = {"dim depth heads": ">= 1", "dropout token_dropout": "[0, 1)"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim % self.heads:
            raise ConfigError(f"mixer needs dim divisible by heads; got dim={self.dim}, heads={self.heads}")


@dataclass(frozen=True)
class QueryConfig:
    """The phone-side model: a light backbone + GeM + whitening FC + L2."""

    backbone: str = "mobilenetv2_100"
    pretrained: bool | str = True
    image_size: int | None = 64


@dataclass(frozen=True)
class JointConfig(Checked):
    """Mixer + query training (AFF). classifier: momentum (W_q EMA of W_mix, no gradient) | shared (one
    W for both, back-propagated by both). schedule: joint (after `mixer_epochs` of mixer-only warm-up on
    the cached features, mixer and query train together for `epochs`) | two_stage (the mixer trains
    alone for `mixer_epochs`, then the query alone for `epochs` against the frozen W_mix)."""

    classifier: str = "momentum"
    alpha: float = 0.99
    schedule: str = "joint"
    epochs: int = 3
    mixer_epochs: int = 15
    batch_size: int = 64
    mixer_lr: float = 1e-3
    query_lr: float = 1e-3
    query_backbone_lr_scale: float = 0.5
    weight_decay: float = 1e-4
    arcface_s: float = 30.0
    arcface_m: float = 0.3
    query_weight: float = 1.0
    augment: bool = True
    max_steps: int | None = None  # cap on steps per epoch (tests / smoke runs)
    seed: int = 0
    _where = "train"
    _checks = {"classifier": ("momentum", "shared"), "schedule": ("joint", "two_stage"), "alpha": "[0, 1]",
               "epochs mixer_epochs": ">= 0", "batch_size": ">= 2", "max_steps": ">= 1 or null"}


@dataclass(frozen=True)
class BaselineConfig:
    """The concat+MLP baseline, trained with ArcFace on the cached features."""

    concat_mlp: bool = True
    epochs: int = 20
    lr: float = 1e-3


NOISE_DRAWS = ("fixed", "redrawn")


@dataclass(frozen=True)
class RobustnessConfig(Checked):
    """Noisy gallery features added to the extractors, each group in turn, to see whether the mixer ignores
    them where the ensemble cannot: `extractors` (weak ones, e.g. kind "rmac", or "cvnet" with train.epochs 0
    on an untrained / ImageNet-only backbone) and a pure Gaussian-noise feature of `noise_dim` dims (0 = none).
    Each noisy set gets its own mixer (the main mixer's feature-only stage, same settings and seed).

    `noise_draws`: one row per entry. "fixed": one cached draw per image, as an extracted feature is; a mixer
    trained on a few hundred images can memorise those rows (a random code per training image).
    "redrawn": the training rows are drawn afresh at every step, so the noise cannot be memorised, as it
    cannot be among GLDv2's 1.5M images in the paper; evaluation reads the cached draw either way."""

    extractors: tuple[ExtractorConfig, ...] = ()
    noise_dim: int = 0
    noise_draws: tuple[str, ...] = ("fixed",)
    _where = "robustness"
    _checks = {"noise_dim": ">= 0"}  # 0: no noise feature

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [d for d in self.noise_draws if d not in NOISE_DRAWS]
        if bad or not self.noise_draws or len(set(self.noise_draws)) != len(self.noise_draws):
            raise ConfigError(f"robustness.noise_draws must be distinct entries of {list(NOISE_DRAWS)}, got "
                              f"{list(self.noise_draws)}")

    @property
    def enabled(self) -> bool:
        return bool(self.extractors) or self.noise_dim > 0

    def noise_extractor(self, seed: int) -> ExtractorConfig:
        """The pure-noise feature as an extractor config (its tiny backbone is never run)."""
        return ExtractorConfig("noise", name="noise", backbone="tiny_resnet", dim=self.noise_dim,
                               train=ExtractorTrainConfig(epochs=0, seed=seed))


def _default_extractors() -> tuple[ExtractorConfig, ...]:
    """Small CPU extractors: real DELG/DOLG/CVNet heads on small backbones, briefly trained with ArcFace."""
    return (
        ExtractorConfig("delg", backbone="tiny_resnet", image_size=64, dim=128, local_dim=32, num_local=8,
                        attention_hidden=64, train=ExtractorTrainConfig(epochs=3, lr=2e-3, seed=1)),
        ExtractorConfig("dolg", backbone="tiny_efficientnet", image_size=64, dim=128, local_dim=64,
                        dilations=(1, 2, 3), train=ExtractorTrainConfig(epochs=3, lr=2e-3, seed=2)),
        ExtractorConfig("cvnet", backbone="efficientnet_lite0", pretrained=True, image_size=64, dim=128,
                        train=ExtractorTrainConfig(epochs=1, lr=1e-3, backbone_lr_scale=0.1, freeze_stem=True, seed=3)),
    )


@dataclass(frozen=True)
class AFFConfig(RunConfig, run="aff_small"):
    """One `train aff` run: the gallery extractors, the mixer and query model, the baseline and study rows."""

    data: DataConfig = field(default_factory=DataConfig)
    ablations: tuple[str, ...] = ("shared",)
    embedding_dim: int = 256
    extractors: tuple[ExtractorConfig, ...] = field(default_factory=_default_extractors)
    mixer: MixerConfig = field(default_factory=MixerConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    train: JointConfig = field(default_factory=JointConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    fusion_variants: tuple[str, ...] = ()  # fusions trained beside the mixer, each with its query model
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    leave_one_out: bool = False  # the mixer's feature-only stage without each gallery feature in turn
    extract_batch_size: int = 128
    _checks = {"embedding_dim": ">= 1"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.extractors:
            raise ConfigError("extractors: give at least one gallery extractor")
        names = [e.name for e in self.extractors]
        if len(set(names)) != len(names):
            raise ConfigError(f"extractor names repeat: {names}; set a distinct 'name' for each")
        check_known(self.ablations, ABLATIONS, "ablation")
        check_known(self.fusion_variants, FUSION_VARIANTS, "fusion variant")
        clash = {e.name for e in self.robustness.extractors} & set(names + ["noise"] * (self.robustness.noise_dim > 0))
        if clash or len({e.name for e in self.robustness.extractors}) != len(self.robustness.extractors):
            raise ConfigError(f"robustness.extractors names must be distinct from each other, the extractors and "
                              f"'noise'; repeated: {sorted(clash) or [e.name for e in self.robustness.extractors]}")
        if self.leave_one_out and len(self.extractors) < 2:
            raise ConfigError("leave_one_out needs at least two extractors")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> AFFConfig:
    """Defaults, updated by the file at `path` (JSON/YAML) and then by dotted `overrides`."""
    return load_config_file(AFFConfig, path, overrides, defaults=AFFConfig().to_dict())

