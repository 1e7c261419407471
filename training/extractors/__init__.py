"""Gallery feature extractors for the asymmetric system's cloud side: DELG, DOLG and CVNet's global
descriptor, as real architectures on any ResNet/EfficientNet-family registry backbone.

    from training.extractors import ExtractorConfig, build_extractor, train_extractor
    ex = build_extractor(ExtractorConfig("delg", backbone="resnet50", num_local=100), num_classes=n)
    train_extractor(ex, labelled_images)           # ArcFace (+ DELG's local-feature losses)
    feats = ex.extract(batch)                       # Extracted(global_, local, local_scores, local_count)

Released checkpoints of the public PyTorch ports load with `load_released` (training/extractors/released.py).
"""

from training.extractors.base import (
    KINDS,
    Extracted,
    ExtractorConfig,
    ExtractorError,
    ExtractorTrainConfig,
    GalleryExtractor,
    Trunk,
    build_extractor,
    load_extractor,
    save_extractor,
)
from training.extractors.fit import train_extractor
from training.extractors.released import RELEASED_LAYOUTS, load_released

__all__ = [
    "KINDS", "Extracted", "ExtractorConfig", "ExtractorError", "ExtractorTrainConfig", "GalleryExtractor", "Trunk",
    "build_extractor", "load_extractor", "save_extractor", "train_extractor",
    "RELEASED_LAYOUTS", "load_released",
]
