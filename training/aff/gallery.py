"""The cloud side of an AFF embedding space: frozen extractors + the trained mixer, one module.

`AFFGallery` is saved like every other model (training/checkpoint.py): gallery.safetensors holds the
extractors' and the mixer's configs and weights in one file, with the embedding-space id shared with
the query model. Its forward pass is the whole gallery side on one image batch, so `retrieval-sdk
export` writes it as one ONNX graph (gallery.onnx) that the SDK runs like any gallery model.

Input: images preprocessed with `AFFGallery.spec` (the spec of the extractor with the largest input).
Each extractor gets the batch resized to its own input size and re-normalised to its own mean/std
inside the graph, then the mixer fuses their global (and DELG's top-k local) features ->
float32, L2-normalised embeddings (ARCHITECTURE.md contract 3). Multi-scale extraction and the top-k
local features fix the graph's H x W to the spec's size (the batch stays dynamic).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdk.preprocess import PreprocessSpec
from training.aff.mixer import MixerArch, build_mixer, local_key, mask_key
from training.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from training.embed import embed_images
from training.extractors.base import GalleryExtractor


class AFFGallery(nn.Module):
    """Extractors + mixer: images -> gallery embeddings in the AFF space."""

    module_type = "aff_gallery"
    dynamic_hw = False  # export: multi-scale resizing and top-k locals are traced at the spec's size

    def __init__(self, extractors: Sequence[GalleryExtractor], mixer: nn.Module, embedding_space: str):
        super().__init__()
        self.extractors = nn.ModuleList(extractors)
        self.mixer = mixer
        self.embedding_space = embedding_space
        self.spec: PreprocessSpec = max((ex.spec for ex in extractors), key=lambda s: s.input_size[0] * s.input_size[1])

    @property
    def embedding_dim(self) -> int:
        return int(self.mixer.embedding_dim)

    def module_config(self) -> dict:
        return {"embedding_space": self.embedding_space, "mixer": self.mixer.arch.to_dict(),
                "extractors": [ex.module_config() for ex in self.extractors]}

    @classmethod
    def from_config(cls, config: dict) -> "AFFGallery":
        extractors = [GalleryExtractor.from_config(c) for c in config["extractors"]]
        return cls(extractors, build_mixer(MixerArch.from_dict(config["mixer"])), config["embedding_space"])

    def _input_for(self, x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
        """The batch as `spec` would have preprocessed it: resized, re-normalised (identity when equal)."""
        if tuple(spec.input_size) != tuple(self.spec.input_size):
            x = F.interpolate(x, size=tuple(spec.input_size), mode="bilinear", align_corners=False)
        if tuple(spec.mean) != tuple(self.spec.mean) or tuple(spec.std) != tuple(self.spec.std):
            to = lambda v: torch.tensor(v, dtype=x.dtype)[None, :, None, None]  # noqa: E731
            x = (x * to(self.spec.std) + to(self.spec.mean) - to(spec.mean)) / to(spec.std)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed with `self.spec` -> (B, embedding_dim) unit-norm gallery embeddings."""
        inputs: dict[str, torch.Tensor] = {}
        for ex in self.extractors:
            feats = ex.extract(self._input_for(x, ex.spec))
            inputs[ex.name] = feats.global_
            if feats.local is not None:
                # the feature cache stores local descriptors as float16: round the same way
                inputs[local_key(ex.name)] = feats.local.half().float()
                inputs[mask_key(ex.name)] = torch.arange(feats.local.shape[1])[None] < feats.local_count[:, None]
        return self.mixer(inputs)

    def embed_images(self, images: Sequence, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Embed image paths / PIL images (preprocessed with `self.spec`) as float32 rows."""
        return embed_images(self, images, self.spec, batch_size, desc="gallery", progress=progress)


def save_gallery(path: str | Path, mixer: nn.Module, extractors: Sequence[GalleryExtractor],
                 embedding_space: str, extra: dict | None = None) -> Path:
    """Write gallery.safetensors: the extractors and the mixer trained on their features, one module."""
    gallery = AFFGallery(extractors, mixer, embedding_space)
    return save_checkpoint(gallery, path, CheckpointMeta(embedding_space, role="gallery", name="aff-gallery",
                                                         extra=extra or {}))


def load_gallery(path: str | Path) -> AFFGallery:
    """Rebuild the gallery side saved by `save_gallery` (eval mode)."""
    return load_checkpoint(path, expect="aff_gallery")[0]
