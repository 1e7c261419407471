"""The phone-side query model and AFF's momentum classifier.

The query model is a plain `training.models.EmbeddingModel`: a light backbone (MobileNetV2 by default,
ImageNet weights from the shipped package; EfficientNet-Lite0..2 or ShuffleNetV2 as options) + GeM +
whitening FC + L2, so `save_checkpoint` writes it in the format `retrieval-sdk export` reads.

AFF trains it against the mixer's classifier without letting it pull that classifier around: the
query's ArcFace uses W_q, a copy of the mixer's class weights W_mix that receives no gradient and
follows W_mix as an exponential moving average after every step, W_q <- alpha W_q + (1 - alpha) W_mix.
`ClassifierMode` also gives the ablations: "shared" (the query's loss uses W_mix itself and
back-propagates into it) and "frozen" (W_q fixed, used by two-stage training once the mixer is done).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.backbones import resolve_backbone
from training.losses import ArcFace, arcface_logits
from training.models import EmbeddingModel, ModelConfig
from training.errors import TrainingError

QUERY_BACKBONES = ("mobilenetv2_100", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                   "shufflenet_v2_x1_0")
ClassifierMode = Literal["momentum", "shared", "frozen"]
CLASSIFIER_MODES = ("momentum", "shared", "frozen")


def build_query_model(backbone: str, embedding_dim: int, image_size: int | None = None,
                      pretrained: bool | str = True) -> EmbeddingModel:
    """backbone + GeM + whitening FC (-> embedding_dim) + L2, as an exportable EmbeddingModel."""
    if resolve_backbone(backbone).arch not in QUERY_BACKBONES and not backbone.startswith("tiny_"):
        raise TrainingError(f"query backbone must be one of {QUERY_BACKBONES} (or tiny_* for tests), got {backbone!r}")
    return EmbeddingModel(ModelConfig(backbone, "gem", embedding_dim=embedding_dim, input_size=image_size),
                          pretrained=pretrained)


class QueryClassifier(nn.Module):
    """The query side's ArcFace class weights, tied to the mixer's `source` ArcFace by `mode`.

    momentum: W_q is a buffer (no gradient), initialised to W_mix, updated by `update()` after each step;
    shared:   the mixer's own parameter is used (gradients from the query flow into W_mix);
    frozen:   W_q is a buffer copied once from W_mix and never updated.
    """

    def __init__(self, source: ArcFace, mode: ClassifierMode = "momentum", alpha: float = 0.99):
        super().__init__()
        if mode not in CLASSIFIER_MODES:
            raise TrainingError(f"classifier mode must be one of {CLASSIFIER_MODES}, got {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise TrainingError(f"momentum alpha must be in [0, 1], got {alpha}")
        self.mode, self.alpha = mode, float(alpha)
        self.source = [source]  # a list, so the mixer's ArcFace is not registered twice as a submodule
        self.register_buffer("weight", source.weight.detach().clone())

    @property
    def current(self) -> Tensor:
        return self.source[0].weight if self.mode == "shared" else self.weight

    @torch.no_grad()
    def update(self) -> None:
        """W_q <- alpha W_q + (1 - alpha) W_mix (momentum mode only)."""
        if self.mode == "momentum":
            self.weight.mul_(self.alpha).add_(self.source[0].weight.detach(), alpha=1.0 - self.alpha)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy W_mix into W_q (start of a stage)."""
        self.weight.copy_(self.source[0].weight.detach())

    def loss(self, embeddings: Tensor, labels: Tensor, s: float, m: float) -> Tensor:
        logits = arcface_logits(embeddings, self.current, labels, s, m)
        return F.cross_entropy(logits, labels.long())

    def extra_repr(self) -> str:
        return f"mode={self.mode}, alpha={self.alpha}"
