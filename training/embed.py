"""Run a torch embedding model over images in batches, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sdk.preprocess import PreprocessSpec, preprocess_image


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
        raise ValueError("no images to embed")
    return np.concatenate(chunks).astype(np.float32)
