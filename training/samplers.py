"""Class-balanced batches for metric learning: the P x K sampler (P classes, K images each), which batch-hard
triplet mining needs (Hermans et al. 2017: every anchor has K - 1 positives and (P - 1) K negatives)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from training.errors import TrainingError

SMALL_CLASSES = ("error", "repeat", "drop")


class PKSampler(Sampler[list[int]]):
    """Batches of indices: P distinct classes drawn at random, K distinct images of each.

    A class with fewer than K images is an error (`small_classes="error"`), is drawn with repeats
    (`"repeat"`: the same image, differently augmented, fills its K slots; it needs >= 2 images to hold a
    positive pair), or is left out (`"drop"`). An epoch is `batches` batches (default: the images / (P K),
    at least 1). Epoch e draws from numpy's generator seeded with (seed, e), so a run, or a resumed one
    that replays its epochs, sees the same batches.
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, batches: int | None = None,
                 small_classes: str = "error", seed: int = 0) -> None:
        if p < 2 or k < 2:
            raise TrainingError(f"P x K sampling needs P >= 2 classes and K >= 2 images per batch (a positive and a "
                                f"negative for every anchor), got P={p}, K={k}")
        if small_classes not in SMALL_CLASSES:
            raise TrainingError(f"small_classes must be one of {SMALL_CLASSES}, got {small_classes!r}")
        labels = np.asarray(labels)
        members = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        if len(members) < 2:
            raise TrainingError(f"the training set has {len(members)} class(es); metric learning needs at least 2 "
                                "labelled classes (one subfolder per class)")
        small = sorted(c for c, idx in members.items() if len(idx) < k)
        if small and small_classes == "error":
            raise TrainingError(f"{len(small)} of {len(members)} classes have fewer than K={k} images (e.g. class "
                                f"{small[0]} has {len(members[small[0]])}); add images, lower K, or set "
                                "small_classes to 'repeat' (draw with repeats) or 'drop' (leave them out)")
        minimum = 2 if small_classes == "repeat" else k
        self.classes = [c for c, idx in members.items() if len(idx) >= minimum]
        if len(self.classes) < p:
            raise TrainingError(f"P={p} classes per batch but only {len(self.classes)} classes have >= {minimum} "
                                f"images; lower P to at most {len(self.classes)}")
        self.members, self.p, self.k, self.seed, self.epoch = members, p, k, seed, 0
        self.repeated = [c for c in self.classes if len(members[c]) < k]
        self.dropped = [c for c in small if c not in self.classes]
        self.batches = batches if batches is not None else max(1, len(labels) // (p * k))
        if self.batches < 1:
            raise TrainingError(f"batches per epoch must be >= 1, got {self.batches}")

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for _ in range(self.batches):
            batch: list[int] = []
            for c in rng.choice(self.classes, self.p, replace=False):
                idx = self.members[int(c)]
                batch += rng.choice(idx, self.k, replace=len(idx) < self.k).tolist()
            yield batch
