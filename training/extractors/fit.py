"""Train a gallery extractor with ArcFace (plus its own auxiliary terms) on a labelled image set."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from training.data import ImageDataset, LabelledImages
from training.extractors.base import ExtractorError, GalleryExtractor
from training.fit import FitConfig, OptimConfig, fit
from training.transforms import eval_transform, train_transform


def _param_groups(extractor: GalleryExtractor) -> list[dict]:
    t = extractor.config.train
    trunk = extractor.trunk
    backbone_ids = {id(p) for p in trunk.backbone.parameters()}
    heads = [p for p in extractor.parameters() if id(p) not in backbone_ids and p.requires_grad]
    backbone = trunk.tail_parameters() + ([] if t.freeze_stem else trunk.stem_parameters())
    groups = [{"params": heads, "lr": t.lr}]
    if t.backbone_lr_scale > 0:
        groups.append({"params": backbone, "lr": t.lr * t.backbone_lr_scale})
    else:
        for p in backbone:
            p.requires_grad_(False)
    return groups


def train_extractor(extractor: GalleryExtractor, data: LabelledImages, progress: bool = True,
                    log: Callable[[str], None] = print, device: str = "cpu",
                    checkpoint: dict | None = None) -> list[dict[str, float]]:
    """Train in place for `config.train.epochs` epochs with `training.fit`; return each epoch's mean loss terms.
    `checkpoint`: FitConfig checkpoint arguments (`training.fit.stage_fit`) to make the run resumable.

    AdamW with the cosine schedule; the backbone's learning rate is scaled by `backbone_lr_scale` and the
    layers below conv4 are frozen with `freeze_stem` (cheaper, and kinder to pretrained weights).
    """
    t = extractor.config.train
    if extractor.arcface is None:
        raise ExtractorError(f"extractor {extractor.name} was built without num_classes: it cannot be trained")
    if len(data) < 2:
        raise ExtractorError(f"extractor {extractor.name}: need at least 2 training images, got {len(data)}")
    n_classes = len(data.classes)
    if n_classes != extractor.num_classes:
        raise ExtractorError(
            f"extractor {extractor.name} has an ArcFace head for {extractor.num_classes} classes but the training "
            f"set has {n_classes}"
        )
    torch.manual_seed(t.seed)
    extractor.trunk.set_freeze_stem(t.freeze_stem)
    transform = train_transform(extractor.spec, seed=t.seed) if t.augment else eval_transform(extractor.spec)
    loader = DataLoader(
        ImageDataset(data, transform), batch_size=t.batch_size, shuffle=True,
        drop_last=len(data) > t.batch_size, generator=torch.Generator().manual_seed(t.seed),
    )
    weights = extractor.loss_weights()

    def step(batch) -> dict:
        terms = extractor.train_losses(*batch)
        return {"loss": sum(weights[k] * v for k, v in terms.items()), **terms}

    history = fit(step, loader, {"extractor": extractor}, _param_groups(extractor),
                  OptimConfig("adamw", weight_decay=t.weight_decay),
                  FitConfig(epochs=t.epochs, max_steps=t.max_steps, device=device, channels_last=True,
                            desc=extractor.name, progress=progress, **(checkpoint or {})), log=log)
    extractor.cpu()  # feature extraction and saving run on the CPU
    return [{k: v for k, v in h.items() if k != "loss"} for h in history]
