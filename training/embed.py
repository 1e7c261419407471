"""Run a torch embedding model over images in batches, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sdk.preprocess import PreprocessSpec, preprocess_image

from training.errors import TrainingError


@torch.no_grad()
def embed_images(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: Sequence,
    spec: PreprocessSpec,
    batch_size: int = 32,
    desc: str = "embedding",
    progress: bool = True,
) -> np.ndarray:
    """Images (paths or PIL) -> float32 (N, D) embeddings, preprocessed exactly as the SDK does."""
    owner = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)  # e.g. model.pooled
    if isinstance(owner, nn.Module):
        owner.eval()
    chunks = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        x = torch.from_numpy(np.stack([preprocess_image(img, spec) for img in batch]))
        chunks.append(model(x).float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    if not chunks:
        raise TrainingError("no images to embed")
    return np.concatenate(chunks).astype(np.float32)


def embed_multiscale(model: nn.Module, images: Sequence, spec: PreprocessSpec,
                     scales: Sequence[float] = (1.0, 2 ** -0.5, 0.5), p: float = 3.0, batch_size: int = 32,
                     desc: str = "embedding (multi-scale)", progress: bool = True) -> np.ndarray:
    """Multi-scale embeddings: the image embedded at each scale of spec's input size, the per-scale
    vectors combined by a generalised mean (power p, as GeM; plain mean when a vector has negative
    entries, e.g. after an FC) and L2-normalised (Radenovic et al.'s multi-scale evaluation)."""
    h, w = spec.input_size
    per_scale = [embed_images(model, images, spec.with_size((max(1, round(h * s)), max(1, round(w * s)))),
                              batch_size, f"{desc} x{s:.2f}", progress) for s in scales]
    stack = np.stack(per_scale)
    power = p if (stack >= 0).all() else 1.0
    combined = np.mean(stack ** power, axis=0) ** (1.0 / power)
    return (combined / np.maximum(np.linalg.norm(combined, axis=1, keepdims=True), 1e-12)).astype(np.float32)
