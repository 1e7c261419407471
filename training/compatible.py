"""Compatibility fine-tune: teach a light query model to land in a frozen gallery model's space.

Feature distillation on pairs: the same (augmented) image goes through the frozen gallery model and
the query model, and the query model learns to reproduce the gallery embedding. Labels are not
needed, so every random crop is one more training pair.

Two stages: (1) the query's whitening FC is fitted in closed form (ridge regression from the query's
pooled features to the gallery embeddings, on the clean images plus `views` random crops of each), unless
`closed_form` is off: a query model that starts as a copy of the gallery model (the quickstart's default)
already has the gallery's whitening, which beats a refit on a few hundred photos; (2) optional end-to-end
epochs (SGD, BatchNorm statistics frozen) minimising 1 - cos(query, gallery), on the images and the photos,
one random crop of each per epoch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from sdk.preprocess import image_size, load_image, preprocess_image
from training.embed import embed_images
from training.fit import FitConfig, OptimConfig, fit, resolve_device
from training.models import EmbeddingModel
from training.transforms import random_box
from training.errors import TrainingError


@dataclass(frozen=True)
class CompatConfig:
    views: int = 4  # random crops per training image for the closed-form fit (plus the clean image)
    photo_views: int | None = None  # random crops per real photo (`photos`); None: photo_crop_budget spread over them
    photo_crop_budget: int = 4000  # photo crops in all when photo_views is None: 40 each for 100 photos or fewer,
    # fewer each for more photos (at least 4), so the fit's time grows slowly with the number of photos
    crop_scale: tuple[float, float] = (0.2, 1.0)
    ridge: float = 1.0  # relative ridge strength (times the number of pairs)
    epochs: int = 0  # end-to-end epochs after the closed-form fit
    batch_size: int = 32
    lr: float = 0.01  # SGD learning rate of the FC; the backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 0.1
    seed: int = 0
    closed_form: bool = True  # stage 1; False keeps the query model's own FC (e.g. the gallery's, inherited)


MAX_PHOTO_VIEWS, MIN_PHOTO_VIEWS = 40, 4


def photo_views(cfg: CompatConfig, n_photos: int) -> int:
    """Random crops per real photo: cfg.photo_views, or the crop budget spread over `n_photos`."""
    if cfg.photo_views is not None:
        return cfg.photo_views
    return max(MIN_PHOTO_VIEWS, min(MAX_PHOTO_VIEWS, cfg.photo_crop_budget // max(n_photos, 1)))


def fit_linear_map(x: np.ndarray, y: np.ndarray, ridge: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression y ~ x W^T + b in closed form (ridge scaled by the number of rows); returns (W, b)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc + ridge * len(x) * np.eye(x.shape[1])
    w = np.linalg.solve(gram, xc.T @ yc).T
    return w.astype(np.float32), (my - mx @ w.T).astype(np.float32)


def _box(size: tuple[int, int], cfg: CompatConfig, rng: random.Random) -> tuple[int, int, int, int]:
    return random_box(*size, cfg.crop_scale, (3 / 4, 4 / 3), rng)


MAX_CROP_SIDE = 1536  # a crop's shorter side at most this (the models see 160-260 px; every packaged photo is smaller)


def _cut(img, box):
    """The crop resized back to the image's own aspect and resolution, its shorter side capped at
    MAX_CROP_SIDE (the models' spec resizes it later). The cap spares a 5120x2880 photo's crops a resize to
    14.7 megapixels each; photos up to 1536 px get exactly the crops they always did."""
    if box is None:
        return img
    scale = min(1.0, MAX_CROP_SIDE / min(img.size))
    return img.crop(box).resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)


def _crop_plan(images: Sequence, cfg: CompatConfig, rng: random.Random, views: int) -> list[tuple]:
    """(image, box) pairs: each clean image (box None), then `views` rounds of one random box per
    image. Only the boxes are drawn here; the pixels are cut in `_embed_crops`."""
    sizes = [image_size(img) for img in images]  # headers only; an unreadable file is named here
    plan = [(img, None) for img in images]
    for _ in range(views):
        plan += [(img, _box(size, cfg, rng)) for img, size in zip(images, sizes)]
    return plan


def _embed_crops(plan: list[tuple], models: Sequence[tuple], progress: bool, chunk: int = 32) -> list[np.ndarray]:
    """Each planned crop through each (model, spec), in plan order. One source image is decoded at a
    time and at most `chunk` crops are held, so memory stays bounded however large the photos (keeping
    every full-resolution crop of 5120x2880 wallpapers took tens of GiB)."""
    if not plan:
        raise TrainingError("no images to embed")
    first: dict[int, int] = {}
    for k, (source, _) in enumerate(plan):
        first.setdefault(id(source), k)
    order = sorted(range(len(plan)), key=lambda k: first[id(plan[k][0])])  # stable: one image's crops together
    rows: list[list[np.ndarray]] = [[] for _ in models]
    bar = tqdm(total=len(plan), desc="crop pairs", unit="crop", disable=not progress, leave=False)
    current, img, batch = None, None, []

    def flush() -> None:
        for out, (model, spec) in zip(rows, models):
            out.append(embed_images(model, batch, spec, progress=False))
        bar.update(len(batch))
        batch.clear()

    for k in order:
        source, box = plan[k]
        if source is not current:
            current, img = source, load_image(source)
        batch.append(_cut(img, box))
        if len(batch) == chunk:
            flush()
    if batch:
        flush()
    bar.close()
    inverse = np.argsort(np.asarray(order))
    return [np.concatenate(out)[inverse] for out in rows]


def train_compatible(query: EmbeddingModel, gallery: nn.Module, gallery_spec, images: Sequence, cfg: CompatConfig,
                     progress: bool = True, device: str = "cpu", photos: Sequence = ()) -> dict:
    """Fine-tune `query` into `gallery`'s space on `images` (cfg.views crops each) and real `photos`
    (`photo_views` crops each); returns the fit/training losses and the number of pairs."""
    if query.embedding_dim != gallery.embedding_dim:
        raise TrainingError(f"query model dim {query.embedding_dim} != gallery dim {gallery.embedding_dim}: "
                         "build the query model with embedding_dim equal to the gallery's")
    if cfg.closed_form and not hasattr(query.whiten, "fc"):
        raise TrainingError("the query model needs a whitening FC (ModelConfig(embedding_dim=...)) to be fitted")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    history = {"fit_cosine_loss": None, "pairs": 0, "epoch_losses": []}
    if cfg.closed_form:
        plan = _crop_plan(images, cfg, rng, cfg.views) + _crop_plan(photos, cfg, rng, photo_views(cfg, len(photos)))
        targets, pooled = _embed_crops(plan, [(gallery, gallery_spec), (query.pooled, query.spec)], progress)
        w, b = fit_linear_map(pooled, targets, cfg.ridge)
        with torch.no_grad():  # the whitening FC set to the closed-form fit
            query.whiten.fc.weight.copy_(torch.from_numpy(w))
            query.whiten.fc.bias.copy_(torch.from_numpy(b))
            fitted = torch.nn.functional.normalize(query.whiten(torch.from_numpy(pooled)), dim=-1).numpy()
        history |= {"fit_cosine_loss": float(1 - (fitted * targets).sum(1).mean()), "pairs": len(plan)}
    if cfg.epochs:
        sources = list(images) + list(photos)  # the real photos train end to end too, one random crop per epoch
        history["epoch_losses"] = _train_end_to_end(query, gallery, gallery_spec, sources, cfg, rng, progress, device)
    query.eval()
    return history


class _CropPairs:
    """One pass per epoch: the images in a new order, in batches of random crops, each crop preprocessed
    for the query model and for the gallery model. Images are decoded batch by batch, never all held (a
    folder of camera photos decoded at once is tens of GiB)."""

    def __init__(self, images: list, cfg: CompatConfig, rng: random.Random, query_spec, gallery_spec):
        self.images, self.cfg, self.rng, self.specs = images, cfg, rng, (query_spec, gallery_spec)

    def __len__(self) -> int:
        return -(-len(self.images) // self.cfg.batch_size)

    def __iter__(self):
        order = list(range(len(self.images)))
        self.rng.shuffle(order)
        for start in range(0, len(order), self.cfg.batch_size):
            batch = [load_image(self.images[i]) for i in order[start:start + self.cfg.batch_size]]
            crops = [_cut(img, _box(img.size, self.cfg, self.rng)) for img in batch]
            yield tuple(torch.from_numpy(np.stack([preprocess_image(c, spec) for c in crops])) for spec in self.specs)


def _train_end_to_end(query, gallery, gallery_spec, images, cfg, rng, progress, device) -> list[float]:
    """SGD on 1 - cos(query, gallery) over random crops, BatchNorm statistics frozen (`training.fit`)."""
    gallery.eval().to(resolve_device(device))

    def step(batch) -> dict:
        x_query, x_gallery = batch
        with torch.no_grad():
            target = gallery(x_gallery)
        return {"loss": (1 - (query(x_query) * target).sum(-1)).mean()}

    def train_modes(epoch: int) -> None:  # small batches of one dataset: the pretrained BN statistics are kept
        query.train()
        for m in query.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    data = _CropPairs(list(images), cfg, rng, query.spec, gallery_spec)
    groups = [{"params": list(query.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_scale},
              {"params": list(query.pool.parameters()) + list(query.whiten.parameters()), "lr": cfg.lr}]
    history = fit(step, data, {"query": query}, groups, OptimConfig("sgd", weight_decay=0.0, schedule="constant"),
                  FitConfig(epochs=cfg.epochs, device=device, desc="compat", progress=progress),
                  on_epoch_start=train_modes, log=None)
    query.cpu(), gallery.cpu()
    return [h["loss"] for h in history]
