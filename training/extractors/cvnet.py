"""CVNet's global descriptor (Lee, Seong, Lee, Kim; "Correlation Verification for Image Retrieval", CVPR 2022).

The global stage of CVNet is a ResNet with a `GlobalHead`: conv5 -> GeM (learnable p) -> FC (with
bias) to the reduction dim; descriptors are extracted at scales (1/sqrt 2, 1, sqrt 2), each L2-normalised,
summed and normalised again. CVNet trains it with CurricularFace; here it trains with ArcFace like the
other extractors (the `training.losses` module has no CurricularFace). The correlation-verification
re-ranker is not part of the global descriptor and is not built. Module names (`head.pool`, `head.fc`)
follow the released code so its checkpoints map (training.extractors.released).
"""

from __future__ import annotations

from torch import Tensor, nn

from training.extractors.base import ExtractorConfig, GalleryExtractor
from training.pooling import GeM


class GlobalHead(nn.Module):
    def __init__(self, in_channels: int, dim: int, p: float = 3.0):
        super().__init__()
        self.pool = GeM(p=p, learnable=True)
        self.fc = nn.Linear(in_channels, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x))


class CVNetGlobal(GalleryExtractor):
    def __init__(self, config: ExtractorConfig, num_classes: int | None = None):
        super().__init__(config, num_classes)
        self.head = GlobalHead(self.trunk.conv5_channels, config.dim, config.gem_p)
        self._make_arcface()

    def embed(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x)[1])
