"""DOLG: Deep Orthogonal Fusion of Local and Global Features (Yang et al., ICCV 2021).

- local branch on conv4: multi-atrous block (a 1x1 conv, 3x3 convs at several dilation rates and an
  image-pooling branch, concatenated and mixed by a 1x1 conv + ReLU), then self-attention: 1x1 conv ->
  BN; the L2-normalised map is re-weighted by a softplus attention map (ReLU -> 1x1 conv -> softplus);
- global branch on conv5: GeM (learnable p) -> FC to the local width (`fc_t`);
- orthogonal fusion: each local vector loses its projection on the global vector,
  f_orth = f_l - (f_l . f_g / |f_g|^2) f_g; the orthogonal map is average-pooled, concatenated with
  f_g and reduced by an FC (`fc`) to the descriptor, trained with ArcFace.
Module names follow the released PyTorch port (localmodel, pool_g, fc_t, fc) so its checkpoints map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.extractors.base import ExtractorConfig, GalleryExtractor
from training.pooling import GeM


class MultiAtrous(nn.Module):
    """ASPP-style block: [1x1 conv, 3x3 convs with `dilations`, image pooling] -> concat -> 1x1 conv + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilations: tuple[int, ...], branch_channels: int):
        super().__init__()
        self.aspp = nn.ModuleList(
            [nn.Conv2d(in_channels, branch_channels, 1)]
            + [nn.Conv2d(in_channels, branch_channels, 3, padding=d, dilation=d) for d in dilations]
        )
        self.im_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, branch_channels, 1), nn.ReLU())
        self.conv_after = nn.Sequential(nn.Conv2d(branch_channels * (len(dilations) + 2), out_channels, 1), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.im_pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.conv_after(torch.cat([pooled] + [conv(x) for conv in self.aspp], dim=1))


class LocalBranch(nn.Module):
    """Multi-atrous (optional) + self-attention: returns (attention * normalised local map, attention)."""

    def __init__(self, in_channels: int, width: int, dilations: tuple[int, ...], multi_atrous: bool):
        super().__init__()
        self.aspp = MultiAtrous(in_channels, width, dilations, max(1, width // 2)) if multi_atrous else None
        self.conv1 = nn.Conv2d(width if multi_atrous else in_channels, width, 1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 1, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.aspp is not None:
            x = self.aspp(x)
        x = self.bn(self.conv1(x))
        attention = F.softplus(self.conv2(F.relu(x)))
        return attention * F.normalize(x, dim=1), attention


def orthogonal_fusion(local: Tensor, global_: Tensor, eps: float = 1e-6) -> Tensor:
    """Per location, the component of local (B, C, H, W) orthogonal to global (B, C)."""
    g = global_[:, :, None, None]
    projection = (local * g).sum(1, keepdim=True) / (g * g).sum(1, keepdim=True).clamp(min=eps)
    return local - projection * g


class DOLG(GalleryExtractor):
    def __init__(self, config: ExtractorConfig, num_classes: int | None = None):
        super().__init__(config, num_classes)
        c4, c5 = self.trunk.conv4_channels, self.trunk.conv5_channels
        width = config.local_dim
        self.localmodel = LocalBranch(c4, width, config.dilations, config.multi_atrous)
        self.pool_g = GeM(p=config.gem_p, learnable=True)
        self.fc_t = nn.Linear(c5, width)
        self.fc = nn.Linear(2 * width, config.dim)
        self._make_arcface()

    def embed(self, x: Tensor) -> Tensor:
        c4, c5 = self.trunk(x)
        global_ = self.fc_t(self.pool_g(c5))
        local, _ = self.localmodel(c4)
        orth = orthogonal_fusion(local, global_).mean(dim=(2, 3))
        return self.fc(torch.cat([global_, orth], dim=1))
