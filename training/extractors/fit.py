"""Train a gallery extractor with ArcFace (plus its own auxiliary terms) on a labelled image set."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training.data import ImageDataset, LabelledImages
from training.extractors.base import ExtractorError, GalleryExtractor
from training.transforms import eval_transform, train_transform


def _param_groups(extractor: GalleryExtractor) -> list[dict]:
    t = extractor.config.train
    trunk = extractor.trunk
    backbone_ids = {id(p) for p in trunk.backbone.parameters()}
    heads = [p for p in extractor.parameters() if id(p) not in backbone_ids and p.requires_grad]
    backbone = [p for p in trunk.tail_parameters()] + ([] if t.freeze_stem else trunk.stem_parameters())
    groups = [{"params": heads, "lr": t.lr}]
    if t.backbone_lr_scale > 0:
        groups.append({"params": backbone, "lr": t.lr * t.backbone_lr_scale})
    else:
        for p in backbone:
            p.requires_grad_(False)
    return groups


def train_extractor(
    extractor: GalleryExtractor,
    data: LabelledImages,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """Train in place for `config.train.epochs` epochs; return the mean of each loss term per epoch.

    AdamW with a cosine schedule; the backbone's learning rate is scaled by `backbone_lr_scale` and the
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
    opt = torch.optim.AdamW(_param_groups(extractor), weight_decay=t.weight_decay)
    steps_per_epoch = len(loader) if t.max_steps is None else min(len(loader), t.max_steps)
    total = max(1, steps_per_epoch * t.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    weights = extractor.loss_weights()
    history: list[dict[str, float]] = []
    extractor.to(memory_format=torch.channels_last)  # ~2x faster convolutions on CPU
    extractor.train()
    step = 0
    for epoch in range(t.epochs):
        t0 = time.perf_counter()
        sums: dict[str, list[float]] = {}
        bar = tqdm(loader, desc=f"{extractor.name} epoch {epoch + 1}/{t.epochs}", unit="batch",
                   disable=not progress, leave=False, total=steps_per_epoch)
        for i, (x, y) in enumerate(bar):
            if i >= steps_per_epoch:
                break
            terms = extractor.train_losses(x.contiguous(memory_format=torch.channels_last), y)
            loss = sum(weights[k] * v for k, v in terms.items())
            if not torch.isfinite(loss):
                raise ExtractorError(f"extractor {extractor.name}: loss became {loss.item()} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            for k, v in terms.items():
                sums.setdefault(k, []).append(v.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        means = {k: float(np.mean(v)) for k, v in sums.items()}
        history.append(means)
        log(f"  {extractor.name} epoch {epoch + 1}/{t.epochs}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in means.items()) + f" ({time.perf_counter() - t0:.0f} s)")
    extractor.to(memory_format=torch.contiguous_format)
    extractor.eval()
    return history
