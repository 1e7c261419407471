"""DELG: Unifying Deep Local and Global Features for Image Search (Cao, Araujo, Sim; ECCV 2020).

One ResNet, two heads:
- global: conv5 -> GeM (fixed p=3) -> whitening FC (with bias) -> L2, trained with ArcFace;
- local: conv4 (gradient stopped, so the local heads never disturb the backbone) -> an attention
  network (1x1 conv, BN, ReLU, 1x1 conv, softplus) scoring each location, and an autoencoder
  (1x1 conv to `local_dim`, 1x1 conv back + ReLU) whose bottleneck is the local descriptor. The
  autoencoder is trained to reconstruct conv4 (MSE); the attention is trained by classifying the
  attention-weighted mean of the L2-normalised reconstructed features (cross-entropy).
Extraction keeps, per image, the top-k locations by attention score over all scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.extractors.base import Extracted, ExtractorConfig, GalleryExtractor
from training.heads import Whitening
from training.pooling import GeM


class Attention(nn.Module):
    """Location scores: 1x1 conv -> BN -> ReLU -> 1x1 conv -> softplus, (B, C, H, W) -> (B, 1, H, W)."""

    def __init__(self, in_channels: int, hidden: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(self.conv2(F.relu(self.bn(self.conv1(x)))))


class AutoEncoder(nn.Module):
    """1x1-conv autoencoder: `encode` gives the local descriptor, `decode` reconstructs conv4 (ReLU'd)."""

    def __init__(self, in_channels: int, dim: int = 128):
        super().__init__()
        self.encoder = nn.Conv2d(in_channels, dim, 1)
        self.decoder = nn.Conv2d(dim, in_channels, 1)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return F.relu(self.decoder(z))


class DELG(GalleryExtractor):
    def __init__(self, config: ExtractorConfig, num_classes: int | None = None):
        super().__init__(config, num_classes)
        c4, c5 = self.trunk.conv4_channels, self.trunk.conv5_channels
        self.pool = GeM(p=config.gem_p, learnable=False)
        self.whiten = Whitening(c5, config.dim)
        self.attention = Attention(c4, config.attention_hidden)
        self.autoencoder = AutoEncoder(c4, config.local_dim)
        self.attention_classifier = nn.Linear(c4, num_classes) if num_classes else None
        self._make_arcface()

    @property
    def local_dim(self) -> int:
        return self.config.local_dim if self.config.num_local else 0

    @property
    def num_local(self) -> int:
        return self.config.num_local

    def _global(self, c5: Tensor) -> Tensor:
        return self.whiten(self.pool(c5))

    def embed(self, x: Tensor) -> Tensor:
        return self._global(self.trunk(x)[1])

    def train_losses(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        c4, c5 = self.trunk(x)
        losses = {"arcface": self.arcface(self._global(c5), labels)}
        f = c4.detach()  # stop-gradient: local heads train on a fixed backbone (DELG sec. 3.3)
        reconstructed = self.autoencoder.decode(self.autoencoder.encode(f))
        losses["reconstruction"] = F.mse_loss(reconstructed, f)
        attention = self.attention(f)
        pooled = (attention * F.normalize(reconstructed, dim=1)).mean(dim=(2, 3))
        losses["attention"] = F.cross_entropy(self.attention_classifier(pooled), labels)
        return losses

    def loss_weights(self) -> dict[str, float]:
        t = self.config.train
        return {"arcface": 1.0, "reconstruction": t.recon_weight, "attention": t.attention_weight}

    @torch.no_grad()
    def extract(self, x: Tensor) -> Extracted:
        total = None
        descriptors, scores = [], []
        for s in self.config.scales:
            c4, c5 = self.trunk(self._rescaled(x, s))
            g = F.normalize(self._global(c5), dim=-1)
            total = g if total is None else total + g
            if self.num_local:
                d = F.normalize(self.autoencoder.encode(c4), dim=1).flatten(2).transpose(1, 2)  # (B, HW, Dl)
                descriptors.append(d)
                scores.append(self.attention(c4).flatten(1))  # (B, HW)
        global_ = F.normalize(total, dim=-1)
        if not self.num_local:
            return Extracted(global_)
        return Extracted(global_, *top_k_locals(torch.cat(descriptors, 1), torch.cat(scores, 1), self.num_local))


def top_k_locals(descriptors: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the k highest-scoring of (B, N, D) descriptors; pad with zeros (score 0) when N < k.

    Returns descriptors (B, k, D), scores (B, k) in descending order and the valid count per row (B,).
    """
    b, n, d = descriptors.shape
    keep = min(k, n)
    top, idx = scores.topk(keep, dim=1)
    picked = descriptors.gather(1, idx[..., None].expand(b, keep, d))
    count = torch.full((b,), keep, dtype=torch.int32)
    if keep < k:
        picked = torch.cat([picked, picked.new_zeros(b, k - keep, d)], 1)
        top = torch.cat([top, top.new_zeros(b, k - keep)], 1)
    return picked, top, count
