"""Compatibility fine-tune: teach a light query model to land in a frozen gallery model's space.

Targets are the gallery model's embeddings of the clean training images, computed once. The query
model sees augmented views and is pulled to its own target (cosine) and pushed from the other
targets (InfoNCE over the whole target bank), which is what asymmetric retrieval rewards.
The whitening FC is first fitted in closed form (ridge regression) so training starts aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.data import ImageDataset
from training.embed import embed_images
from training.models import EmbeddingModel
from training.transforms import train_transform


@dataclass(frozen=True)
class CompatConfig:
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-4
    backbone_lr_scale: float = 0.1  # backbone moves slower than the new FC
    temperature: float = 0.05
    ridge: float = 1e-2
    seed: int = 0


def fit_linear_map(x: np.ndarray, y: np.ndarray, ridge: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression y ~ x W^T + b in closed form; returns (W (Dy,Dx), b (Dy,))."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc + ridge * len(x) * np.eye(x.shape[1], dtype=x.dtype)
    w = np.linalg.solve(gram, xc.T @ yc).T
    return w.astype(np.float32), (my - mx @ w.T).astype(np.float32)


def compatibility_loss(query: torch.Tensor, targets: torch.Tensor, index: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Cosine pull to the own target + InfoNCE against every target in the bank."""
    pull = (1 - (query * targets[index]).sum(-1)).mean()
    contrast = F.cross_entropy(query @ targets.T / temperature, index)
    return pull + contrast


def train_compatible(model: EmbeddingModel, images: Sequence, targets: np.ndarray, cfg: CompatConfig,
                     progress: bool = True) -> list[float]:
    """Fine-tune `model` (query side) so model(image_i) ~ targets[i]; returns the mean loss per epoch."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} gallery targets")
    if model.embedding_dim != targets.shape[1]:
        raise ValueError(f"query model dim {model.embedding_dim} != gallery dim {targets.shape[1]}")
    torch.manual_seed(cfg.seed)
    pooled = embed_images(model.pooled, images, model.spec, desc="fit FC", progress=progress)
    w, b = fit_linear_map(pooled, targets, cfg.ridge)
    with torch.no_grad():
        model.whiten.fc.weight.copy_(torch.from_numpy(w))
        model.whiten.fc.bias.copy_(torch.from_numpy(b))

    bank = torch.from_numpy(targets)
    data = ImageDataset(list(zip(images, range(len(images)))),
                        transform=train_transform(model.spec, seed=cfg.seed))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.AdamW([
        {"params": model.backbone.parameters(), "lr": cfg.lr * cfg.backbone_lr_scale},
        {"params": list(model.pool.parameters()) + list(model.whiten.parameters()), "lr": cfg.lr},
    ], weight_decay=1e-4)
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        losses = []
        bar = tqdm(loader, desc=f"compat epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress,
                   leave=False)
        for x, idx in bar:
            loss = compatibility_loss(model(x), bank, idx, cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(float(np.mean(losses)))
    model.eval()
    return history
