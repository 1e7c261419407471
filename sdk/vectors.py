"""Embedding arithmetic shared by the runtime and the exporters: L2 normalisation and comparison."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero); keeps the dtype."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def compare_embeddings(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs diff, min cosine) between two (N, D) embedding arrays."""
    return float(np.abs(a - b).max()), float((l2_normalize(a) * l2_normalize(b)).sum(1).min())
