"""`retrieval-sdk evaluate`: every query-side file of a bundle on a user's labelled photos, asymmetric
(that file for the queries, the gallery model for the gallery) beside symmetric (the gallery model on
both sides), optionally re-ranked; a terminal table and results.json (the report is sdk/eval_report.py).

Every file runs through sdk.Embedder (so through sdk.backends.open_runner, the one runtime layer); the
gallery is embedded once, and every embedding pass is cached under OUT/cache keyed by the model file's
sha256 and the images' paths, sizes and modification times, so a second run only recomputes figures.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdk.backends import BackendError
from sdk.bundle import Manifest, ModelFile, read_manifest, save_atomic
from sdk.errors import SdkError, SpaceMismatchError
from sdk.eval_data import Crop, EvalSet, build_eval_set, drop_unreadable, source_keys
from sdk.eval_metrics import (RERANK_METHODS, GallerySearch, Labels, Reranker, SideResult, headline_map, labelled_side,
                              revisited_side)
from sdk.preprocess import ImageError

CACHE_VERSION = 1
DEFAULT_TOP_K = 1000  # labelled sets: ranked list length for mP@10, PR and grids (revisited: the whole database)


@dataclass(frozen=True)
class EvalConfig:
    """The command's arguments."""

    bundle: Path
    images: Path
    labels: str = "auto"  # auto | folders | names | FILE.csv
    gallery: Path | None = None
    gallery_labels: str | None = None
    protocol: str | None = None  # default: revisited with gnd, query-gallery with gallery, else leave-one-out
    gnd: Path | None = None
    gallery_bundle: Path | None = None
    rerank: tuple[str, ...] = ()
    only: tuple[str, ...] = ()  # FORMAT or FORMAT/PRECISION or a file path: evaluate only these files
    out: Path = Path("runs/evaluate")
    top_k: int = 0  # 0: DEFAULT_TOP_K for labelled sets, the whole database for revisited
    index: str = "Flat"
    grid_queries: int = 20
    grid_k: int = 8
    threads: int | None = None
    batch_size: int = 32
    cache: bool = True
    progress: bool = True


@dataclass
class Embedded:
    vectors: np.ndarray
    ok: list[int]  # positions of the sources that were read
    errors: list[tuple[int, str]]
    seconds: float
    cached: bool


@dataclass
class FileRun:
    """One evaluated model file: what it is, how fast it embedded, and its figures."""

    path: str
    role: str  # the bundle model it belongs to: query | gallery
    format: str
    precision: str
    size_bytes: int
    images_per_s: float
    cached: bool
    result: SideResult
    reference: bool = False  # the gallery model's file that embeds the gallery (its row is the symmetric one)
    rerank: dict[str, dict] = field(default_factory=dict)


@dataclass
class EvalRun:
    config: EvalConfig
    data: EvalSet
    space: str
    gallery_file: str
    symmetric: SideResult
    files: list[FileRun]
    skipped: list[tuple[str, str]]  # (file, reason)
    unreadable: list[tuple[str, str]]  # (image, reason)
    top_k: int
    seconds: float
    symmetric_rerank: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class _Model:
    """A model of a bundle: the folder, the role it has there, and its manifest entry."""

    bundle: Path
    role: str
    manifest: Manifest

    @property
    def entry(self):
        return self.manifest.model(self.role)


def _gallery_model(manifest: Manifest, cfg: EvalConfig) -> _Model:
    """The gallery model: the bundle's own, or the one of --gallery-bundle (same embedding space)."""
    if cfg.gallery_bundle is None:
        if "gallery" not in manifest.models:
            raise SdkError(f"bundle {cfg.bundle} has no gallery model (it has: {', '.join(manifest.models)}); "
                           "asymmetric evaluation needs one: pass --gallery-bundle BUNDLE of space "
                           f"{manifest.embedding_space!r}, or export with --gallery CHECKPOINT")
        return _Model(cfg.bundle, "gallery", manifest)
    other = read_manifest(cfg.gallery_bundle)
    if other.embedding_space != manifest.embedding_space:
        raise SpaceMismatchError(f"--gallery-bundle {cfg.gallery_bundle} is embedding space "
                                 f"{other.embedding_space!r}, bundle {cfg.bundle} is {manifest.embedding_space!r}; "
                                 "use the gallery model trained into the query model's space")
    if "gallery" in other.models:
        return _Model(cfg.gallery_bundle, "gallery", other)
    if len(other.models) == 1:
        return _Model(cfg.gallery_bundle, next(iter(other.models)), other)
    raise SdkError(f"--gallery-bundle {cfg.gallery_bundle} has no gallery model (it has: {', '.join(other.models)})")


# ------------------------------------------------------------------------------------------ embedding
class _Embeddings:
    """Embedding passes through sdk.Embedder, cached on disk, one opened model per file."""

    def __init__(self, cfg: EvalConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.cache_dir = cfg.out / "cache"
        self._open: dict[tuple, object] = {}

    def embedder(self, model: _Model, f: ModelFile):
        from sdk.embedder import Embedder

        key = (str(model.bundle), model.role, f.path)
        if key not in self._open:
            self._open[key] = Embedder.from_bundle(model.bundle, backend=f.format, role=model.role,
                                                   precision=f.precision, threads=self.cfg.threads, verify=False)
        return self._open[key]

    def _cache_path(self, model: _Model, f: ModelFile, sources: list) -> Path:
        full = model.bundle / f.path
        stat = [full.stat().st_size, full.stat().st_mtime_ns] if full.is_file() else []
        spec = model.entry.preprocess.to_dict()
        blob = json.dumps([CACHE_VERSION, f.sha256, f.path, stat, spec, source_keys(sources)], default=str)
        return self.cache_dir / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.npz"

    def run(self, model: _Model, f: ModelFile, sources: list, desc: str) -> Embedded:
        path = self._cache_path(model, f, sources)
        if self.cfg.cache and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                errors = json.loads(str(z["errors"]))
                return Embedded(z["vectors"], z["ok"].tolist(), [tuple(e) for e in errors], float(z["seconds"]), True)
        emb = self.embedder(model, f)
        inputs, positions, errors = [], [], []
        for i, s in enumerate(sources):  # revisited queries are crops: cut them here, a bad file skipped
            try:
                inputs.append(s.open() if isinstance(s, Crop) else s)
                positions.append(i)
            except ImageError as e:
                errors.append((i, str(e)))
        t0 = time.perf_counter()
        vectors, ok, bad = emb.embed_valid(inputs, batch_size=self.cfg.batch_size, progress=self.cfg.progress,
                                           desc=desc)
        seconds = time.perf_counter() - t0
        ok = [positions[j] for j in ok]
        errors = sorted(errors + [(positions[j], msg) for j, msg in bad])
        if self.cfg.cache:
            save_atomic(dict(vectors=vectors, ok=np.asarray(ok, np.int64), errors=json.dumps(errors), seconds=seconds),
                        path, _save_npz)
        return Embedded(vectors, ok, errors, seconds, False)


def _save_npz(arrays: dict, path: Path) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez appends ".npz" to a name that lacks it
        np.savez(fh, **arrays)


def _rate(e: Embedded) -> float:
    return len(e.ok) / e.seconds if e.seconds > 0 else float("nan")


# ------------------------------------------------------------------------------------------ the run
def run_evaluation(cfg: EvalConfig, log: Callable[[str], None] = print) -> EvalRun:
    """Embed, evaluate every file, and return the figures (nothing written but the embedding cache)."""
    t_start = time.perf_counter()
    bad_rerank = [m for m in cfg.rerank if m not in RERANK_METHODS]
    if bad_rerank:
        raise SdkError(f"--rerank must be one of {', '.join(RERANK_METHODS)}, got {bad_rerank[0]!r}")
    manifest = read_manifest(cfg.bundle)
    query_model = _Model(cfg.bundle, "query", manifest)
    query_model.entry  # noqa: B018  (a bundle without a query model: one-line BundleError)
    gallery_model = _gallery_model(manifest, cfg)
    data = build_eval_set(cfg.images, cfg.labels, cfg.gallery, cfg.gallery_labels, cfg.gnd, cfg.protocol)
    embeddings = _Embeddings(cfg, log)
    gallery_files = gallery_model.entry.files  # the gallery is embedded by the most precise ONNX file, else the first
    ref = gallery_model.entry.file("onnx") if any(f.format == "onnx" for f in gallery_files) else gallery_files[0]

    gallery_pass = embeddings.run(gallery_model, ref, data.gallery.sources, f"gallery ({ref.path})")
    query_pass = gallery_pass if data.leave_one_out else embeddings.run(gallery_model, ref, data.queries.sources,
                                                                        f"queries ({ref.path})")
    bad_g, bad_q = dict(gallery_pass.errors), dict(query_pass.errors)
    unreadable = [(data.queries.names[i], m) for i, m in sorted(bad_q.items())]
    if not data.leave_one_out:
        unreadable += [(data.gallery.names[i], m) for i, m in sorted(bad_g.items())]
    data = drop_unreadable(data, set(bad_q), set(bad_g))
    G, Qg = gallery_pass.vectors, query_pass.vectors
    n_g = len(G)
    top_k = cfg.top_k if cfg.top_k > 0 else (n_g if data.gnd is not None else min(DEFAULT_TOP_K, n_g))
    search = GallerySearch(G, cfg.index)
    labels = None if data.gnd is not None else Labels(data.queries.labels, data.gallery.labels, data.leave_one_out)

    def side(q: np.ndarray) -> SideResult:
        if labels is None:
            return revisited_side(q, G, data.gnd, search, top_k, cfg.grid_k)
        return labelled_side(q, G, labels, search, top_k, cfg.grid_k)

    reranker = Reranker(G, search)

    def reranked(q: np.ndarray) -> dict[str, dict]:
        if labels is None:
            return {m: reranker.revisited(m, q, data.gnd, top_k) for m in cfg.rerank}
        return {m: reranker.labelled(m, q, labels, top_k) for m in cfg.rerank}

    log(f"evaluating {len(data.queries)} queries against {n_g} gallery images ({data.protocol}); gallery model "
        f"{gallery_model.bundle / ref.path}")
    symmetric = side(Qg)
    sym_rerank = reranked(Qg)
    files, skipped = [], []
    rows = [(query_model, f) for f in query_model.entry.files]
    rows += [(gallery_model, f) for f in gallery_model.entry.files]
    readable = data.queries.sources
    for model, f in rows:
        is_ref = model is gallery_model and f == ref
        wanted = not cfg.only or any(o in (f.format, f"{f.format}/{f.precision}", f.path) for o in cfg.only)
        if not wanted and not is_ref:
            continue
        name = f.path if model.bundle == cfg.bundle else str(model.bundle / f.path)
        if is_ref:
            files.append(FileRun(name, model.entry.role, f.format, f.precision, f.size_bytes, _rate(gallery_pass),
                                 gallery_pass.cached, symmetric, reference=True, rerank=sym_rerank))
            continue
        try:
            embeddings.embedder(model, f)
        except BackendError as e:
            skipped.append((name, str(e)))
            log(f"skipped {name}: {e}")
            continue
        e = embeddings.run(model, f, readable, f"queries ({f.path})")
        if e.errors:  # the same decoder read them a moment ago
            raise SdkError(f"{name}: {len(e.errors)} query images could not be read this time "
                           f"(first: {e.errors[0][1]}); are the files changing?")
        files.append(FileRun(name, model.entry.role, f.format, f.precision, f.size_bytes, _rate(e), e.cached,
                             side(e.vectors), rerank=reranked(e.vectors)))
    return EvalRun(cfg, data, manifest.embedding_space, str(gallery_model.bundle / ref.path), symmetric, files,
                   skipped, unreadable, top_k, time.perf_counter() - t_start, sym_rerank)


# ------------------------------------------------------------------------------------------ outputs
def _pct(x: float) -> str:
    return f"{x * 100:.2f}"


def summary_table(run: EvalRun) -> tuple[list[str], list[list[str]]]:
    """The header and rows shared by the terminal table and the report's summary table."""
    revisited = run.data.gnd is not None
    if revisited:
        header = ["file", "model", "format", "prec", "asym E", "asym M", "asym H", "sym E", "sym M", "sym H",
                  "asym/sym M", "mP@10 M", "img/s"]
    else:
        header = ["file", "model", "format", "prec", "asym mAP", "sym mAP", "asym/sym", "R@1", "R@5", "R@10",
                  "mP@10", "img/s"]
    rows = []

    def cells(m: dict, sym: dict) -> list[str]:
        if revisited:
            d = ("easy", "medium", "hard")
            return ([_pct(m[x]["map"]) for x in d] + [_pct(sym[x]["map"]) for x in d]
                    + [f"{m['medium']['map'] / sym['medium']['map']:.3f}", _pct(m["medium"]["mp_at_k"]["10"])])
        return [_pct(m["map"]), _pct(sym["map"]), f"{m['map'] / sym['map']:.3f}",
                *[_pct(m["recall"][str(k)]) for k in (1, 5, 10)], _pct(m["mp_at_10"])]

    sym = run.symmetric.metrics
    for f in run.files:
        rate = f"{f.images_per_s:.1f}" + (" (cached)" if f.cached else "")
        rows.append([f.path, f.role, f.format, f.precision, *cells(f.result.metrics, sym), rate])
        for method, m in f.rerank.items():
            rows.append([f"  + {method}", "", "", "", *cells(m, run.symmetric_rerank[method]), ""])
    return header, rows


def format_table(run: EvalRun) -> str:
    header, rows = summary_table(run)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    d = run.data
    head = (f"{d.protocol}: {len(d.queries)} queries, {len(d.gallery)} gallery images"
            + (f", {len(np.unique(d.gallery.labels))} classes" if d.gnd is None else f", gnd {d.gnd.name}")
            + f"; gallery embedded by {run.gallery_file}; {len(run.unreadable)} unreadable images skipped")
    tail = [f"skipped {p}: {why}" for p, why in run.skipped]
    return "\n".join([head, *lines, *tail])


def results_dict(run: EvalRun) -> dict:
    """results.json: the run's settings, counts and every file's figures (asymmetric, re-ranked, speed)."""
    d, cfg = run.data, run.config
    return {
        "bundle": str(cfg.bundle), "embedding_space": run.space, "protocol": d.protocol,
        "images": str(cfg.images), "gallery_images": str(cfg.gallery) if cfg.gallery else None,
        "gnd": str(cfg.gnd) if cfg.gnd else None, "labels": cfg.labels,
        "queries": len(d.queries), "gallery": len(d.gallery),
        "classes": None if d.gnd is not None else int(len(np.unique(d.gallery.labels))),
        "unreadable": [{"image": n, "reason": r} for n, r in run.unreadable],
        "index": cfg.index, "top_k": run.top_k, "rerank": list(cfg.rerank),
        "gallery_file": run.gallery_file,
        "symmetric": {**run.symmetric.metrics, "rerank": run.symmetric_rerank},
        "files": [{"path": f.path, "model": f.role, "format": f.format, "precision": f.precision,
                   "size_bytes": f.size_bytes, "images_per_s": f.images_per_s, "cached": f.cached,
                   "gallery_reference": f.reference,
                   "asymmetric": f.result.metrics, "ratio": f.result.map / run.symmetric.map,
                   "rerank": {m: {**v, "ratio": headline_map(v) / headline_map(run.symmetric_rerank[m])}
                              for m, v in f.rerank.items()}}
                  for f in run.files],
        "skipped_files": [{"path": p, "reason": r} for p, r in run.skipped],
        "seconds": run.seconds,
    }


def write_results(run: EvalRun, out: Path) -> Path:
    return save_atomic(json.dumps(results_dict(run), indent=2), out / "results.json")


