"""Weak and noisy gallery features for AFF's robustness study (the paper adds R-MAC, untrained GeM
backbones and a pure Gaussian-noise "feature" to the strong ones and checks the mixer is not fooled).

- `RMACGlobal` ("rmac"): conv5 -> R-MAC (Tolias et al. 2016) -> FC to `dim`; with `train.epochs: 0` its
  FC is a random projection, so on an ImageNet-only or untrained backbone it is a weak, training-free
  descriptor. (An untrained / ImageNet-only GeM descriptor is kind "cvnet" with `train.epochs: 0`.)
- `GaussianNoise` ("noise"): a `dim`-d vector of N(0, 1) per image, drawn from a generator seeded with
  `train.seed`: carries no information about the image. Its backbone is never run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.extractors.base import ExtractorConfig, ExtractorError, GalleryExtractor
from training.pooling import RMAC


class RMACGlobal(GalleryExtractor):
    """conv5 -> R-MAC (3 levels of regions) -> FC (dim)."""

    def __init__(self, config: ExtractorConfig, num_classes: int | None = None):
        super().__init__(config, num_classes)
        self.pool = RMAC(levels=3)
        self.fc = nn.Linear(self.trunk.conv5_channels, config.dim)
        self._make_arcface()

    def embed(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.trunk(x)[1]))


class GaussianNoise(GalleryExtractor):
    """A pure-noise feature: N(0, 1) of `dim` per image, independent of the pixels."""

    def __init__(self, config: ExtractorConfig, num_classes: int | None = None):
        if config.train.epochs:
            raise ExtractorError(f"extractor {config.name}: a noise feature cannot be trained; set train.epochs to 0")
        super().__init__(config, num_classes)
        self.generator = torch.Generator().manual_seed(config.train.seed)

    def embed(self, x: Tensor) -> Tensor:
        return torch.randn(x.shape[0], self.config.dim, generator=self.generator).to(x.device)
