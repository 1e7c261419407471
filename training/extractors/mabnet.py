"""MABNet as a gallery extractor kind (`kind: mabnet`), so AFF can fuse it with DELG/DOLG/CVNet features.

MABNet is trained by `retrieval-sdk train mabnet` (master/assistant blocks, multi-crop, weight transfer),
not by the extractors' ArcFace loop: the extractor wraps a saved MABNet (`weights` = its mabnet.safetensors,
or mabnet_combined.safetensors for MABNet(C)) and its global feature is the MABNet gallery descriptor (the
fixed crop layout in the graph). `train.epochs` must be 0, and `scales`, `dim` and `image_size` come from
the MABNet checkpoint.
"""

from __future__ import annotations

from torch import Tensor, nn

from training.extractors.base import ExtractorConfig, ExtractorError, GalleryExtractor
from training.mabnet.model import MABNet, MABNetModelConfig


class MABNetExtractor(GalleryExtractor):
    """A trained MABNet read as a gallery extractor (no trunk of its own, no ArcFace head: nothing to train here)."""

    def __init__(self, config: ExtractorConfig, num_classes: int | None = None, model: MABNet | None = None):
        nn.Module.__init__(self)  # not GalleryExtractor.__init__: the MABNet holds its own two backbones
        if model is None:
            if not config.weights:
                raise ExtractorError(f"extractor {config.name}: kind 'mabnet' needs weights=PATH, the mabnet.safetensors "
                                     "written by `retrieval-sdk train mabnet`")
            from training.mabnet.model import load_mabnet

            model = load_mabnet(config.weights)
        self.config, self.num_classes, self.arcface, self.trunk = config, None, None, None
        self.mabnet = model
        self.spec = model.spec
        self.weights_source = f"train mabnet checkpoint {config.weights}" if config.weights else "saved extractor"

    dynamic_hw = False  # the gallery crops are fixed slices of the input size

    @property
    def global_dim(self) -> int:
        return self.mabnet.embedding_dim

    embedding_dim = global_dim

    def module_config(self) -> dict:
        return {"config": self.config.to_dict(), "num_classes": None, "mabnet": self.mabnet.module_config()}

    @classmethod
    def from_saved(cls, config: dict) -> "MABNetExtractor":
        """Rebuild from `module_config()` (weights come with the state dict)."""
        ec = ExtractorConfig.from_dict(config["config"])
        return cls(ec, model=MABNet(MABNetModelConfig(**{**config["mabnet"], "pretrained": False})))

    def embed(self, x: Tensor) -> Tensor:
        """The MABNet gallery descriptor (already multi-view: no extra scales)."""
        return self.mabnet(x)

    global_descriptor = embed
