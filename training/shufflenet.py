"""ShuffleNetV2 (Ma et al. 2018) as a timm model, so `create_backbone("shufflenet_v2_x1_0")` builds it like
any other backbone (a query-model option for the AFF pipeline; timm itself has no ShuffleNet).

The network is torchvision's pure-Python implementation (no compiled ops needed), wrapped with timm's
feature-extractor interface: `forward_features` -> (B, 1024, H/32, W/32), `num_features`, `feature_info`.
No ImageNet weights for it are available offline: it is random-init unless a local file is passed.
Imported by training.backbones (after the torchvision shim) to register the names.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

from training.errors import TrainingError


class ShuffleNetV2(nn.Module):
    """torchvision ShuffleNetV2 without its classifier, exposing timm's feature interface."""

    def __init__(self, width: str = "1_0", num_classes: int = 0, global_pool: str = "", **_: object):
        super().__init__()
        from torchvision.models import shufflenetv2

        tv = getattr(shufflenetv2, f"shufflenet_v2_x{width}")(weights=None)
        self.conv1, self.maxpool = tv.conv1, tv.maxpool
        self.stage2, self.stage3, self.stage4, self.conv5 = tv.stage2, tv.stage3, tv.stage4, tv.conv5
        self.num_features = tv.conv5[0].out_channels
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        chans = [tv.conv1[0].out_channels, tv.stage2[-1].branch2[-3].out_channels * 2,
                 tv.stage3[-1].branch2[-3].out_channels * 2, self.num_features]
        self.feature_info = [
            dict(num_chs=chans[0], reduction=4, module="maxpool"),
            dict(num_chs=chans[1], reduction=8, module="stage2"),
            dict(num_chs=chans[2], reduction=16, module="stage3"),
            dict(num_chs=chans[3], reduction=32, module="conv5"),
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if self.global_pool:
            x = x.mean(dim=(2, 3))
        return self.fc(x) if self.num_classes else x


@register_model
def shufflenet_v2_x1_0(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    if pretrained:
        raise TrainingError("no pretrained ShuffleNetV2 weights are available here; pass a local file instead")
    return ShuffleNetV2("1_0", **{k: v for k, v in kwargs.items() if k in ("num_classes", "global_pool")})
