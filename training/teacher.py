"""A black-box teacher for rank distillation: images in, L2-normalised embeddings out, nothing else seen.

Teacher embeddings of the unlabelled set are computed once and cached on disk, one small .npy per image,
keyed by the teacher's fingerprint (what produced the embedding) and the image's sha256 (what was
embedded), so a second run, a resumed run or an ablation on the same images costs no teacher call.
Calls are counted per image and capped by a budget that is checked *before* the first call: a run that
would need more stops with an error and does no work. A failed call writes nothing to the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sdk.bundle import save_atomic, sha256_path
from sdk.vectors import l2_normalize
from training.errors import TrainingError

DEFAULT_CACHE = Path("~/.cache/retrieval-sdk/teacher")


class TeacherError(TrainingError):
    """The teacher cannot be reached or used as asked (budget, dim, failed call); the message says why."""


@dataclass(frozen=True)
class Teacher:
    """Any image -> embedding function, with a fingerprint that changes whenever its output would."""

    name: str
    fingerprint: str
    embed: Callable[[Sequence[Path]], np.ndarray]  # paths -> (N, D) float32, rows L2-normalised
    dim: int | None = None
    space: str = ""  # the embedding-space id of the teacher's gallery ("" when it has none)


@dataclass(frozen=True)
class TeacherRun:
    """What one `teacher_embeddings` call did: the embeddings and where each came from."""

    embeddings: np.ndarray  # (N, D) float32
    from_cache: int
    teacher_calls: int  # images sent to the teacher


def _entry(cache: Path, teacher: Teacher, key: str) -> Path:
    return cache / teacher.fingerprint[:32] / key[:2] / f"{key}.npy"


def _save_npy(vector: np.ndarray, path: Path) -> None:
    with open(path, "wb") as fh:
        np.save(fh, vector)


def _check_batch(out: np.ndarray, n: int, teacher: Teacher) -> np.ndarray:
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != n:
        raise TeacherError(f"teacher {teacher.name} returned shape {out.shape} for {n} images; expected ({n}, D)")
    if teacher.dim is not None and out.shape[1] != teacher.dim:
        raise TeacherError(f"teacher {teacher.name} returned {out.shape[1]}-d embeddings, expected {teacher.dim}")
    if not np.isfinite(out).all():
        raise TeacherError(f"teacher {teacher.name} returned NaN or inf; nothing was cached")
    if not np.linalg.norm(out, axis=1).all():
        raise TeacherError(f"teacher {teacher.name} returned an all-zero embedding; nothing was cached")
    return l2_normalize(out)


def teacher_embeddings(teacher: Teacher, paths: Sequence[str | Path], budget: int | None = None,
                       cache: str | Path | None = DEFAULT_CACHE, batch_size: int = 32,
                       progress: bool = True) -> TeacherRun:
    """The teacher's embedding of every path, from the cache where it has one; at most `budget` images
    (None: no cap) go to the teacher, else TeacherError before any call. cache=None: no disk cache."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise TeacherError("no images to embed with the teacher")
    if budget is not None and budget < 0:
        raise TeacherError(f"--teacher-budget must be >= 0, got {budget}")
    root = Path(cache).expanduser() if cache is not None else None
    keys = [sha256_path(p) for p in paths]
    rows: dict[int, np.ndarray] = {}
    if root is not None:
        for i, key in enumerate(keys):
            entry = _entry(root, teacher, key)
            if entry.is_file():
                rows[i] = np.load(entry)
    todo = [i for i in range(len(paths)) if i not in rows]
    first_of: dict[str, int] = {}  # each missing image once: its first index in `paths`
    for i in todo:
        first_of.setdefault(keys[i], i)
    order = list(first_of.values())
    if budget is not None and len(order) > budget:
        raise TeacherError(f"the run needs {len(order)} teacher calls ({len(rows)} of {len(paths)} images are "
                           f"cached for {teacher.name}) but --teacher-budget is {budget}: raise the budget, "
                           "use fewer images, or reuse a cache that holds them")
    calls = 0
    bar = tqdm(total=len(order), desc=f"teacher {teacher.name}", unit="img", disable=not progress or not order,
               leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        try:
            out = teacher.embed([paths[i] for i in idx])
        except TeacherError:
            raise
        except Exception as e:  # a black box fails in its own ways: one line, nothing cached for this batch
            raise TeacherError(f"teacher {teacher.name} failed on {paths[idx[0]].name} and {len(idx) - 1} more: "
                               f"{type(e).__name__}: {e}") from e
        out = _check_batch(out, len(idx), teacher)
        calls += len(idx)
        for i, vector in zip(idx, out):
            rows[i] = vector
            if root is not None:
                save_atomic(vector, _entry(root, teacher, keys[i]), write=_save_npy)
        bar.update(len(idx))
    bar.close()
    by_key = {keys[i]: rows[i] for i in rows}
    embeddings = np.stack([by_key[k] for k in keys]).astype(np.float32)
    dims = {v.shape[-1] for v in by_key.values()}
    if len(dims) != 1:
        raise TeacherError(f"the cache for {teacher.name} holds embeddings of dims {sorted(dims)}: clear "
                           f"{root / teacher.fingerprint[:32] if root else 'it'} and re-run")
    return TeacherRun(embeddings, from_cache=len(paths) - len(todo), teacher_calls=calls)


def bundle_teacher(bundle: str | Path, role: str = "gallery", threads: int | None = None) -> Teacher:
    """A bundle's gallery model (ONNX through the SDK's runtime, no torch) as the teacher."""
    from sdk.bundle import read_manifest
    from sdk.embedder import Embedder

    bundle = Path(bundle)
    try:
        manifest = read_manifest(bundle)
        entry = manifest.model(role)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise TeacherError(f"cannot use {bundle} as a teacher: {e}") from e
    mfile = entry.file("onnx", None)
    embedder = Embedder.from_bundle(bundle, role=role, threads=threads)
    fingerprint = hashlib.sha256(f"bundle:{manifest.embedding_space}:{mfile.sha256}".encode()).hexdigest()
    return Teacher(f"{bundle.name}/{mfile.path}", fingerprint, lambda ps: embedder.embed(list(ps)),
                   dim=entry.embedding_dim, space=manifest.embedding_space)


def checkpoint_teacher(path: str | Path, batch_size: int = 32) -> Teacher:
    """A project checkpoint (torch) as the teacher: its embedding of each image, preprocessed by its spec."""
    from training.embed import embed_images
    from training.models import load_checkpoint

    path = Path(path)
    model, meta = load_checkpoint(path)
    model.eval()
    fingerprint = hashlib.sha256(f"checkpoint:{sha256_path(path)}".encode()).hexdigest()
    return Teacher(path.name, fingerprint,
                   lambda ps: embed_images(model, list(ps), model.spec, batch_size=batch_size, progress=False),
                   dim=model.embedding_dim, space=meta.embedding_space)


def server_teacher(url: str, api_key: str | None = None, batch_size: int = 32) -> Teacher:
    """A running `retrieval-sdk serve` as the teacher: its gallery model embeds each image (POST /v1/embed,
    a write-scope key); the fingerprint is its embedding space and gallery model file."""
    from sdk.client import Client
    from sdk.errors import SdkError

    try:
        client = Client(url, api_key=api_key, retries=1)
    except SdkError as e:
        raise TeacherError(f"teacher {url} is unreachable: {e}") from e
    model = client.server_model
    role = model["gallery_model"]
    entry = model["manifest"]["models"][role]
    files = ",".join(sorted(str(f.get("sha256", "")) for f in entry.get("files", [])))
    fingerprint = hashlib.sha256(f"server:{model['embedding_space']}:{role}:{files}".encode()).hexdigest()
    return Teacher(f"{url} ({role})", fingerprint,
                   lambda ps: client.embed(list(ps), role=role, batch_size=batch_size), dim=int(model["embedding_dim"]),
                   space=model["embedding_space"])


def resolve_teacher(spec: str | Path, api_key: str | None = None) -> Teacher:
    """The teacher a user names: a project checkpoint (.safetensors), a bundle folder (manifest.json) or
    the URL of a running `retrieval-sdk serve`."""
    if str(spec).startswith(("http://", "https://")):
        return server_teacher(str(spec), api_key)
    path = Path(spec)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise TeacherError(f"teacher {path} is a folder without manifest.json: pass a bundle folder "
                               "(retrieval-sdk export) or a .safetensors checkpoint")
        return bundle_teacher(path)
    if path.is_file():
        try:
            return checkpoint_teacher(path)
        except TrainingError as e:
            raise TeacherError(f"teacher {path} is not a usable checkpoint: {e}") from e
    raise TeacherError(f"teacher {spec} not found: pass a .safetensors checkpoint, a bundle folder or a serve URL")
