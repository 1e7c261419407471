"""Gallery features extracted once and cached on disk, memory-mapped, and read back by index.

A cache is a folder: one `.npy` file per array (read with `np.load(mmap_mode="r")`, so a large dataset
never has to fit in memory) and `header.json`, written last, recording the format, the dataset
fingerprint (image identities + labels), the image count, the extractor (name, config, weights
fingerprint) and each array's shape and dtype. Arrays:
    global       (N, D)      float32, unit norm
    local        (N, K, Dl)  float16, unit norm, sorted by attention score   (DELG only)
    local_count  (N,)        int32, how many of the K local rows are real      (DELG only)

Opening a cache checks the header against what the caller expects (same dataset, same count) and
that the files hold what the header says, so a cache from another dataset or a truncated file is a
clear error instead of silently wrong features. `FeatureSet` lines several caches up with labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training.aff.mixer import FeatureSpec, local_key, mask_key
from training.data import LabelError
from training.errors import TrainingError

CACHE_FORMAT = "retrieval-sdk/feature-cache"
CACHE_VERSION = 1
HEADER = "header.json"  # written last: a folder without it holds no complete cache


class FeatureCacheError(TrainingError):
    """A feature cache is missing, damaged, or belongs to other images or another extractor."""


# ------------------------------------------------------------------------------------------ fingerprints


def dataset_fingerprint(sources: Sequence, labels: Sequence[int]) -> str:
    """A hash of the images' identities and labels: file path + size for files, pixels for in-memory images."""
    if len(sources) != len(labels):
        raise LabelError(f"{len(sources)} images but {len(labels)} labels")
    h = hashlib.sha256()
    for src, y in zip(sources, labels):
        if isinstance(src, Image.Image):
            h.update(f"{src.size}{src.mode}".encode())
            h.update(src.tobytes())
        else:
            p = Path(src)
            size = p.stat().st_size if p.is_file() else -1
            h.update(f"{p}|{size}".encode())
        h.update(f"|{int(y)};".encode())
    return h.hexdigest()[:20]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's state dict (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


# ------------------------------------------------------------------------------------------ cache


class FeatureCache:
    """An opened cache: `header` (dict) and memory-mapped `arrays` (read-only)."""

    def __init__(self, root: Path, header: dict, arrays: dict[str, np.ndarray]):
        self.root, self.header, self.arrays = root, header, arrays

    @property
    def name(self) -> str:
        return self.header["extractor"]["name"]

    @property
    def count(self) -> int:
        return int(self.header["count"])

    @property
    def dataset(self) -> str:
        return self.header["dataset"]

    @property
    def global_(self) -> np.ndarray:
        return self.arrays["global"]

    @property
    def global_dim(self) -> int:
        return int(self.arrays["global"].shape[1])

    @property
    def has_local(self) -> bool:
        return "local" in self.arrays

    def specs(self, use_local: bool = True) -> list[FeatureSpec]:
        out = [FeatureSpec(self.name, self.global_dim)]
        if use_local and self.has_local:
            _, k, d = self.arrays["local"].shape
            out.append(FeatureSpec(self.name, int(d), local=True, tokens=int(k)))
        return out

    def __repr__(self) -> str:
        return f"FeatureCache({self.name!r}, count={self.count}, dims={ {k: v.shape[1:] for k, v in self.arrays.items()} })"


def read_header(root: str | Path) -> dict | None:
    """The cache header, or None when `root` holds no complete cache."""
    path = Path(root) / HEADER
    if not path.is_file():
        return None
    try:
        header = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FeatureCacheError(f"{path} is not a readable cache header ({e}); delete {root} to rebuild it") from None
    if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
        raise FeatureCacheError(f"{path} is not a retrieval-sdk feature cache header")
    if header.get("version") != CACHE_VERSION:
        raise FeatureCacheError(f"{path} is cache version {header.get('version')}, this code reads {CACHE_VERSION}; "
                                f"delete {root} to rebuild it")
    return header


def open_cache(root: str | Path, dataset: str | None = None, count: int | None = None,
               extractor: str | None = None) -> FeatureCache:
    """Open a complete cache read-only, checking it against the expected dataset fingerprint, image count
    and extractor name (each optional)."""
    root = Path(root)
    header = read_header(root)
    if header is None:
        raise FeatureCacheError(f"no feature cache at {root} (expected {root}/header.json); extract features first")
    name = header["extractor"]["name"]
    if extractor is not None and name != extractor:
        raise FeatureCacheError(f"feature cache {root} holds '{name}' features, not '{extractor}'")
    if dataset is not None and header["dataset"] != dataset:
        raise FeatureCacheError(
            f"feature cache {root} was extracted from another dataset (fingerprint {header['dataset']}, "
            f"{header['count']} images; this one is {dataset}" + (f", {count} images" if count is not None else "")
            + f"). Delete {root}, point the cache elsewhere, or rerun with --overwrite-cache"
        )
    if count is not None and int(header["count"]) != count:
        raise FeatureCacheError(f"feature cache {root} holds {header['count']} images, expected {count}")
    arrays = {}
    for key, meta in header["arrays"].items():
        path = root / meta["file"]
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise FeatureCacheError(f"cannot read {path} ({e}); the cache is damaged: delete {root} to rebuild it") from None
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            raise FeatureCacheError(
                f"{path} holds {arr.dtype} {tuple(arr.shape)} but the header says {meta['dtype']} {tuple(meta['shape'])}; "
                f"the cache is damaged: delete {root} to rebuild it"
            )
        arrays[key] = arr
    if "global" not in arrays:
        raise FeatureCacheError(f"feature cache {root} has no global features")
    return FeatureCache(root, header, arrays)


@torch.no_grad()
def extract_features(
    extractor,
    sources: Sequence,
    labels: Sequence[int],
    root: str | Path,
    batch_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    desc: str | None = None,
) -> FeatureCache:
    """Extract `extractor`'s features of `sources` into a cache at `root`, or reuse the one there.

    Reused when its header matches (same dataset, same extractor weights); re-extracted when the
    extractor changed; an error when it belongs to another dataset, unless `overwrite`.
    """
    from training.data import ImageDataset
    from training.transforms import eval_transform

    root = Path(root)
    dataset = dataset_fingerprint(sources, labels)
    wfp = weights_fingerprint(extractor)
    header = read_header(root)
    if header is not None:
        if header["dataset"] != dataset and not overwrite:
            open_cache(root, dataset=dataset, count=len(sources))  # raises the "another dataset" error
        if header["dataset"] == dataset and header["extractor"].get("weights") == wfp:
            cache = open_cache(root, dataset=dataset, count=len(sources), extractor=extractor.name)
            log(f"  {extractor.name}: cached features {root} ({cache.count} images)")
            return cache
        log(f"  {extractor.name}: cache {root} is stale ({'other dataset' if header['dataset'] != dataset else 'extractor changed'}); re-extracting")
    tmp = root.with_name(root.name + ".partial")
    for old in (root, tmp):  # the stale cache, and the folder of an interrupted extraction
        if old.exists():
            shutil.rmtree(old)
    tmp.mkdir(parents=True)

    n = len(sources)
    if n == 0:
        raise FeatureCacheError("no images to extract features from")
    shapes = {"global": ((n, extractor.global_dim), "float32")}
    if extractor.num_local:
        shapes["local"] = ((n, extractor.num_local, extractor.local_dim), "float16")
        shapes["local_count"] = ((n,), "int32")
    arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", mode="w+", dtype=dt, shape=shape)
              for k, (shape, dt) in shapes.items()}
    extractor.eval()
    loader = DataLoader(ImageDataset(list(zip(sources, range(n))), eval_transform(extractor.spec)),
                        batch_size=batch_size, shuffle=False)
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=desc or f"extract {extractor.name}", unit="img", disable=not progress, leave=False)
    extractor.to(memory_format=torch.channels_last)  # faster CPU convolutions; same numbers
    for x, idx in loader:
        out = extractor.extract(x.contiguous(memory_format=torch.channels_last))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        arrays["global"][lo:hi] = out.global_.float().numpy()
        if extractor.num_local:
            arrays["local"][lo:hi] = out.local.numpy().astype(np.float16)
            arrays["local_count"][lo:hi] = out.local_count.numpy()
        bar.update(len(idx))
    bar.close()
    extractor.to(memory_format=torch.contiguous_format)
    for arr in arrays.values():
        arr.flush()
    del arrays
    header = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "dataset": dataset,
        "count": n,
        "extractor": {"name": extractor.name, "kind": extractor.config.kind, "weights": wfp,
                      "config": extractor.config.to_dict()},
        "arrays": {k: {"file": f"{k}.npy", "shape": list(shape), "dtype": dt} for k, (shape, dt) in shapes.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / HEADER).write_text(json.dumps(header, indent=1))
    os.replace(tmp, root)  # the folder appears complete or not at all
    log(f"  {extractor.name}: extracted {n} images in {header['seconds']:.0f} s -> {root}")
    return open_cache(root, dataset=dataset, count=n)


# ------------------------------------------------------------------------------------------ feature set


def check_labels(labels: Sequence, count: int, num_classes: int | None = None, what: str = "images") -> np.ndarray:
    """Labels as int64, after checking there is one per item, none missing, all in range."""
    if labels is None:
        raise LabelError(f"the {what} have no class labels; AFF training needs one label per image")
    raw = list(labels)
    if len(raw) != count:
        raise LabelError(f"{count} {what} but {len(raw)} labels: every image needs exactly one class label")
    missing = [i for i, y in enumerate(raw) if y is None or (isinstance(y, float) and np.isnan(y))]
    if missing:
        raise LabelError(f"image {missing[0]} of the {what} has no class label ({len(missing)} missing in all)")
    arr = np.asarray(raw)
    if arr.dtype.kind not in "iu":
        raise LabelError(f"class labels must be integers, got {arr.dtype} (e.g. {raw[0]!r})")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise LabelError(f"image {int(np.argmin(arr))} of the {what} has label {int(arr.min())}: a missing class label")
    if num_classes is not None and arr.size and arr.max() >= num_classes:
        raise LabelError(f"image {int(np.argmax(arr))} of the {what} has label {int(arr.max())} but the classifier "
                         f"has {num_classes} classes (0..{num_classes - 1}): a class without a label name")
    return arr


class FeatureSet:
    """Several extractors' caches of the same images, aligned by index, plus the images' labels.

    Construction checks that every cache has the same image count (and dataset), the labels fit, and
    names are unique. `load()` copies the arrays into memory (small sets); otherwise batches read the
    memory maps.
    """

    def __init__(self, caches: Sequence[FeatureCache], labels: Sequence[int] | None, num_classes: int | None = None,
                 use_local: bool = True, redraw: Sequence[str] = ()):
        """`redraw`: names of pure-noise features whose rows `batch()` draws afresh from N(0, 1) (torch's
        generator) on every read instead of reading the cache, so a training set cannot memorise them."""
        if not caches:
            raise FeatureCacheError("no feature caches given")
        names = [c.name for c in caches]
        if len(set(names)) != len(names):
            raise FeatureCacheError(f"feature names repeat: {names}; give each extractor its own name")
        counts = {c.name: c.count for c in caches}
        if len(set(counts.values())) != 1:
            raise FeatureCacheError(
                f"features have mismatched counts {counts}: every feature must describe the same images in the same order"
            )
        datasets = {c.dataset for c in caches}
        if len(datasets) != 1:
            raise FeatureCacheError(f"features come from different datasets ({sorted(datasets)}): "
                                    + ", ".join(f"{c.name}: {c.dataset}" for c in caches))
        self.caches = list(caches)
        self.count = caches[0].count
        self.labels = check_labels(labels, self.count, num_classes)
        self.use_local = use_local
        unknown = sorted(set(redraw) - set(names))
        if unknown:
            raise FeatureCacheError(f"features to redraw {unknown} are not among the features {names}")
        self.redraw = frozenset(redraw)
        self._arrays = {c.name: c.arrays for c in caches}

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.caches]

    @property
    def fingerprint(self) -> list:
        """What these features are: the images and each extractor's weights (a resumable stage's key)."""
        fp = [self.caches[0].dataset, self.use_local, [(c.name, c.header["extractor"]["weights"]) for c in self.caches]]
        return fp + [sorted(self.redraw)] if self.redraw else fp

    def specs(self) -> tuple[FeatureSpec, ...]:
        return tuple(s for c in self.caches for s in c.specs(self.use_local))

    def load(self) -> "FeatureSet":
        """Copy every array into memory (float32 locals) for fast random batches."""
        self._arrays = {
            name: {k: (np.asarray(v, dtype=np.float32) if k == "local" else np.array(v)) for k, v in arrays.items()}
            for name, arrays in self._arrays.items()
        }
        return self

    def globals_(self) -> list[np.ndarray]:
        return [np.asarray(self._arrays[n]["global"], dtype=np.float32) for n in self.names]

    def batch(self, index: np.ndarray | Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Mixer inputs for the images at `index`."""
        idx = np.asarray(index, dtype=np.int64)
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            arrays = self._arrays[name]
            out[name] = (torch.randn(len(idx), arrays["global"].shape[1]) if name in self.redraw
                         else torch.from_numpy(np.ascontiguousarray(arrays["global"][idx], dtype=np.float32)))
            if self.use_local and "local" in arrays:
                out[local_key(name)] = torch.from_numpy(np.ascontiguousarray(arrays["local"][idx], dtype=np.float32))
                count = torch.from_numpy(np.asarray(arrays["local_count"][idx], dtype=np.int64))
                k = arrays["local"].shape[1]
                out[mask_key(name)] = torch.arange(k)[None, :] < count[:, None]
        return out
