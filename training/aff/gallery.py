"""The cloud side of an AFF embedding space: frozen extractors + the trained mixer, saved as one file.

`gallery.pt` ("retrieval-sdk/aff-gallery" v1) holds the mixer (its `MixerArch` and weights), the
embedding-space id shared with the query model, and for each extractor its name, config, weights
fingerprint and the path (relative to gallery.pt) of its own checkpoint (`save_extractor` format).
`AFFGallery.embed_images` runs the whole gallery side on images: each extractor with its own
preprocessing, then the mixer -> float32, L2-normalised embeddings (ARCHITECTURE.md contract 3).
Export of the mixer to ONNX is not part of this format yet (see docs/aff.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sdk.preprocess import preprocess_image
from training.aff.features import weights_fingerprint
from training.aff.mixer import MixerArch, build_mixer, local_key, mask_key
from training.checkpoint_io import read_tagged, save_atomic
from training.extractors.base import GalleryExtractor, load_extractor
from training.errors import TrainingError

GALLERY_FORMAT = "retrieval-sdk/aff-gallery"
GALLERY_VERSION = 1


class GalleryCheckpointError(TrainingError):
    pass


def save_gallery(path: str | Path, mixer: nn.Module, extractors: Sequence[tuple[GalleryExtractor, Path]],
                 embedding_space: str, extra: dict | None = None) -> Path:
    """Write gallery.pt; `extractors` pairs each extractor with its saved checkpoint path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    for ex, ckpt in extractors:
        try:
            rel = str(Path(ckpt).resolve().relative_to(path.parent.resolve()))
        except ValueError:
            rel = str(Path(ckpt).resolve())
        entries.append({"name": ex.name, "checkpoint": rel, "config": ex.config.to_dict(),
                        "weights": weights_fingerprint(ex)})
    payload = {
        "format": GALLERY_FORMAT,
        "version": GALLERY_VERSION,
        "embedding_space": embedding_space,
        "embedding_dim": int(mixer.embedding_dim),
        "mixer": {"arch": mixer.arch.to_dict(), "state_dict": mixer.state_dict()},
        "extractors": entries,
        "extra": extra or {},
    }
    return save_atomic(payload, path)


class AFFGallery(nn.Module):
    """Extractors + mixer: images -> gallery embeddings in the AFF space."""

    def __init__(self, extractors: Sequence[GalleryExtractor], mixer: nn.Module, embedding_space: str):
        super().__init__()
        self.extractors = nn.ModuleList(extractors)
        self.mixer = mixer
        self.embedding_space = embedding_space

    @property
    def embedding_dim(self) -> int:
        return int(self.mixer.embedding_dim)

    @torch.no_grad()
    def embed_images(self, images: Sequence, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        self.eval()
        out = []
        bar = tqdm(total=len(images), desc="gallery", unit="img", disable=not progress, leave=False)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            inputs: dict[str, torch.Tensor] = {}
            for ex in self.extractors:
                x = torch.from_numpy(np.stack([preprocess_image(img, ex.spec) for img in batch]))
                feats = ex.extract(x)
                inputs[ex.name] = feats.global_
                if feats.local is not None:
                    # the cache stores local descriptors as float16: round the same way
                    inputs[local_key(ex.name)] = feats.local.half().float()
                    inputs[mask_key(ex.name)] = torch.arange(feats.local.shape[1])[None] < feats.local_count[:, None]
            out.append(self.mixer(inputs).float().numpy())
            bar.update(len(batch))
        bar.close()
        if not out:
            raise ValueError("no images to embed")
        return np.concatenate(out).astype(np.float32)


def load_gallery(path: str | Path) -> AFFGallery:
    """Rebuild the gallery side from gallery.pt and its extractor checkpoints (checked by fingerprint)."""
    path = Path(path)
    payload = read_tagged(
        path, GalleryCheckpointError, "AFF gallery checkpoint", GALLERY_FORMAT,
        "it is written by `retrieval-sdk train aff` (gallery.pt in the run folder)",
    )
    extractors = []
    for entry in payload["extractors"]:
        ckpt = Path(entry["checkpoint"])
        ckpt = ckpt if ckpt.is_absolute() else path.parent / ckpt
        ex = load_extractor(ckpt)
        if weights_fingerprint(ex) != entry["weights"]:
            raise GalleryCheckpointError(
                f"extractor checkpoint {ckpt} has changed since the mixer was trained on its features "
                "(weights fingerprint differs); retrain the mixer"
            )
        extractors.append(ex)
    arch = MixerArch.from_dict(payload["mixer"]["arch"])
    mixer = build_mixer(arch)
    mixer.load_state_dict(payload["mixer"]["state_dict"], strict=True)
    return AFFGallery(extractors, mixer.eval(), payload["embedding_space"]).eval()
