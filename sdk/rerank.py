"""Re-ranking after the first search: average query expansion (AQE), alpha-weighted query expansion
(alphaQE) and offline diffusion with late truncation.

- AQE (Chum et al. 2007): the new query is the mean of the query and its top-k results.
- alphaQE (Radenovic et al. 2018): the same mean weighted by similarity**alpha (alpha=0 is AQE).
- Diffusion (Yang et al., AAAI 2019, "decoupling diffusion into online and offline processing", as
  used for post-processing in MABNet): offline, a random walk on the gallery's mutual kNN graph is
  solved for every gallery item, restricted to its `truncation` nearest items *after* the graph is
  built on the whole gallery (late truncation); online, a query's score vector is the combination
  of the offline vectors of its kq nearest items weighted by similarity**gamma.

numpy (+ faiss for kNN); scipy only for diffusion on galleries larger than `truncation`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from sdk.errors import SdkError
from sdk.vectors import l2_normalize

Method = Literal["none", "aqe", "alpha_qe", "diffusion"]
RERANK_METHODS = get_args(Method)


def _as_rows(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or not np.isfinite(x).all():
        raise SdkError(f"{what} must be a finite (n, d) float array, got shape {x.shape}")
    return x


def _topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row, best first: (values, indices)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1)
    return np.take_along_axis(scores, idx, 1), idx


# ------------------------------------------------------------------------------------------ query expansion
def expand(queries: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """New queries from the originals (n, d), their top neighbours' vectors (n, k, d) and similarities (n, k).

    alpha=0: AQE (plain mean with the query); alpha>0: alphaQE, weights sim**alpha (negative sims count 0).
    """
    q = _as_rows(queries, "queries")
    if neighbours.ndim != 3 or neighbours.shape[:2] != sims.shape or neighbours.shape[0] != q.shape[0]:
        raise SdkError(f"neighbours must be (n, k, d) and sims (n, k); got {neighbours.shape} and {sims.shape}")
    w = np.ones_like(sims, dtype=np.float32) if alpha == 0 else np.clip(sims, 0, None).astype(np.float32) ** alpha
    return l2_normalize(q + np.einsum("nk,nkd->nd", w, neighbours.astype(np.float32)))


def query_expansion(queries, gallery, k: int = 2, alpha: float = 0.0, exclude_self: bool = False) -> np.ndarray:
    """Expanded queries against a gallery matrix (exact search). exclude_self: queries are the gallery
    itself, leave-one-out (a query is not expanded with itself)."""
    if k < 1:
        raise SdkError(f"query expansion needs k >= 1, got {k}")
    q, g = _as_rows(queries, "queries"), _as_rows(gallery, "gallery")
    s = q @ g.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    sims, idx = _topk(s, k)
    return expand(q, g[idx], sims, alpha)


def aqe(queries, gallery, k: int = 2, exclude_self: bool = False) -> np.ndarray:
    """Average query expansion with the top-k gallery items."""
    return query_expansion(queries, gallery, k, 0.0, exclude_self)


def alpha_qe(queries, gallery, k: int = 2, alpha: float = 3.0, exclude_self: bool = False) -> np.ndarray:
    """alpha-weighted query expansion with the top-k gallery items."""
    return query_expansion(queries, gallery, k, alpha, exclude_self)


# ------------------------------------------------------------------------------------------------- diffusion
@dataclass(frozen=True)
class DiffusionConfig:
    """Defaults chosen on a validation set (procedural objects, seed 1, never used for reporting) for
    galleries with a handful of views per object. Yang et al.'s settings for Oxford/Paris-size sets,
    with hundreds of relevant images per query, are kd=50, kq=10, alpha=0.99, truncation=1000."""

    kd: int = 5  # neighbours per node in the gallery graph (mutual kNN)
    kq: int = 2  # query neighbours whose offline vectors are combined
    truncation: int = 1000  # late truncation: entries kept per offline vector
    alpha: float = 0.5  # random-walk continuation probability
    gamma: float = 3.0  # similarity exponent for graph weights and query weights
    cg_iters: int = 20
    cg_tol: float = 1e-6


class Diffusion:
    """Offline diffusion over a gallery (n, d); `scores(queries)` gives query-to-gallery diffusion scores."""

    def __init__(self, gallery, config: DiffusionConfig = DiffusionConfig()):
        g = _as_rows(gallery, "gallery")
        if g.shape[0] < 2:
            raise SdkError("diffusion needs a gallery of at least 2 items")
        self.gallery = l2_normalize(g)
        self.config = config
        self.n = g.shape[0]
        self._fit()

    def _fit(self) -> None:
        import faiss

        c, n = self.config, self.n
        trunc, kd = min(c.truncation, n), min(c.kd + 1, n)
        knn = faiss.IndexFlatIP(self.gallery.shape[1])
        knn.add(self.gallery)
        sims, ids = knn.search(self.gallery, max(trunc, kd))
        # Mutual kNN graph: i -- j when each is among the other's kd nearest (self excluded).
        nb, nbs = ids[:, :kd], np.clip(sims[:, :kd], 0, None) ** c.gamma
        rows, cols, vals = np.repeat(np.arange(n), kd), nb.reshape(-1), nbs.reshape(-1)
        keep = (rows != cols) & (cols >= 0)
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        mutual = np.isin(rows.astype(np.int64) * n + cols, cols.astype(np.int64) * n + rows)  # (i, j) and (j, i)
        rows, cols, vals = rows[mutual], cols[mutual], vals[mutual]
        deg = np.bincount(rows, weights=vals, minlength=n) + 1e-12
        dinv = deg ** -0.5
        w = vals * dinv[rows] * dinv[cols]  # D^-1/2 W D^-1/2
        if trunc >= n:
            # Small gallery: the truncated system is the whole one; invert it exactly (numpy only).
            lap = np.eye(n)
            lap[rows, cols] -= c.alpha * w
            self._ids = np.tile(np.arange(n), (n, 1))
            self._vals = np.linalg.inv(lap).astype(np.float32)  # symmetric: row i = diffusion from item i
            return
        try:
            from scipy import sparse
            from scipy.sparse.linalg import cg
        except ImportError:
            raise ImportError("diffusion on a gallery larger than its truncation size needs scipy: "
                              "pip install scipy (or pip install 'retrieval-sdk[server]')") from None
        lap = (sparse.identity(n, format="csr") - c.alpha * sparse.csr_matrix((w, (rows, cols)), shape=(n, n))).tocsr()
        trunc_ids = ids[:, :trunc]
        vals = np.zeros((n, trunc), np.float32)
        e0 = np.zeros(trunc)
        e0[0] = 1.0
        for i, sub in enumerate(trunc_ids):
            vals[i] = cg(lap[sub][:, sub], e0, rtol=c.cg_tol, maxiter=c.cg_iters)[0]
        self._ids, self._vals = trunc_ids.astype(np.int64), vals

    def scores(self, queries, exclude_self: bool = False,
               self_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(diffusion scores (n_q, n), cosine scores (n_q, n)) for queries. exclude_self: the queries are
        the gallery itself (leave-one-out evaluation); a query's own item is not among its kq neighbours.
        self_ids: the same for queries that are gallery items at these positions (leave-one-out in chunks)."""
        q = l2_normalize(_as_rows(queries, "queries"))
        cos = q @ self.gallery.T
        if exclude_self:
            self_ids = np.arange(q.shape[0])
        kq = min(self.config.kq, self.n - 1 if self_ids is not None else self.n)
        knn = cos.copy()
        if self_ids is not None:
            knn[np.arange(q.shape[0]), self_ids] = -np.inf
        sims, idx = _topk(knn, kq)
        weights = np.clip(sims, 0, None) ** self.config.gamma  # (n_q, kq)
        out = np.zeros((q.shape[0], self.n), np.float32)
        for r in range(q.shape[0]):
            cols = self._ids[idx[r]].reshape(-1)
            vals = (weights[r, :, None] * self._vals[idx[r]]).reshape(-1)
            out[r] = np.bincount(cols, weights=vals, minlength=self.n)
        return out, cos

    def rank_scores(self, queries, exclude_self: bool = False, self_ids: np.ndarray | None = None) -> np.ndarray:
        """One score per gallery item whose order is the diffusion ranking: items the diffusion reaches
        first (by diffusion score), then the rest by cosine similarity."""
        f, cos = self.scores(queries, exclude_self, self_ids)
        top = np.maximum(f.max(axis=1, keepdims=True), 1e-30)
        return np.where(f > 0, 3.0 + f / top, cos).astype(np.float32)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery positions by diffusion ranking: (scores, indices)."""
        return _topk(self.rank_scores(queries), k)


# ------------------------------------------------------------------------------ re-ranking an index search
@dataclass(frozen=True)
class RerankConfig:
    """Server/index re-ranking settings (defaults validated like DiffusionConfig's)."""

    qe_k: int = 2  # AQE neighbours
    alpha_qe_k: int = 2  # alphaQE neighbours
    alpha: float = 3.0  # alphaQE exponent (Radenovic et al.)
    diffusion: DiffusionConfig = DiffusionConfig()
    diffusion_max_items: int = 20000  # above this the offline diffusion is too costly to fit on demand
    # Background refits (a server's DiffusionCache): at most one at a time, starting no sooner than
    # max(refit_interval_s, refit_factor x the last fit's time) after the last one ended, so refits take
    # at most ~1/(1 + refit_factor) of one core however fast the gallery changes.
    diffusion_refit_interval_s: float = 5.0
    diffusion_refit_factor: float = 4.0
    diffusion_wait_s: float = 2.0  # how long a search waits for the first fit before a 'retry later'


class DiffusionNotReady(SdkError):
    """The gallery's first diffusion model is still being fitted (in the background): retry later."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class DiffusionCache:
    """A Diffusion fitted on an index's live vectors, refitted when the index has changed.

    background=False (the default: the CLI, tests): a changed index is refitted in the calling thread.
    background=True (the server): fits run in a background thread, one at a time and rate-limited
    (RerankConfig.diffusion_refit_*); searches use the latest fitted model and never wait for a refit:
    items deleted since the fit are dropped from its hits and items added since join at the next fit.
    Only before the first fit does a search wait (up to diffusion_wait_s), then DiffusionNotReady.
    """

    def __init__(self, background: bool = False) -> None:
        self.background = background
        self._lock = threading.Lock()
        self._key = None  # (index id, index version) the model was fitted on
        self._ids: list[str] = []
        self._model: Diffusion | None = None
        self._fitting: threading.Thread | None = None
        self._error: BaseException | None = None
        self._next_fit = 0.0  # monotonic time before which no refit starts
        self.fits = 0
        self.last_fit_s = 0.0

    def get(self, index, config: RerankConfig) -> tuple[list[str], Diffusion]:
        n = len(index)
        if n > config.diffusion_max_items:
            raise SdkError(f"diffusion re-ranking is limited to galleries of {config.diffusion_max_items} "
                           f"items (this one has {n}); use rerank 'aqe' or 'alpha_qe'")
        if n < 2:
            raise SdkError("diffusion re-ranking needs at least 2 gallery items")
        key = (id(index), index.version)
        if not self.background:
            with self._lock:
                if self._key != key or self._model is None:
                    self._fit(index, config, key)
                return self._ids, self._model
        with self._lock:
            if self._key != key and self._fitting is None and time.monotonic() >= self._next_fit:
                self._fitting = threading.Thread(target=self._fit_in_background, args=(index, config, key),
                                                 name="diffusion-fit", daemon=True)
                self._fitting.start()
            if self._model is not None and self._key[0] == id(index):
                return self._ids, self._model
            fitting = self._fitting
        if fitting is not None:
            fitting.join(config.diffusion_wait_s)
        with self._lock:
            if self._model is not None and self._key[0] == id(index):
                return self._ids, self._model
            error, self._error = self._error, None
        if error is not None:  # the fit failed (e.g. scipy missing): say why, once; the next search retries
            raise error
        wait = max(1.0, round(self.last_fit_s or 2 * config.diffusion_wait_s))
        raise DiffusionNotReady(f"the diffusion model of this gallery ({n} items) is being fitted; retry in "
                                f"{wait:.0f} s, or use rerank 'aqe' meanwhile", retry_after=wait)

    def _fit(self, index, config: RerankConfig, key) -> None:
        t0 = time.monotonic()
        ids, vectors = index.live_vectors()
        self._install(ids, Diffusion(vectors, config.diffusion), key)
        self.last_fit_s = time.monotonic() - t0

    def _install(self, ids: list[str], model: Diffusion, key) -> None:
        self._ids, self._model, self._key = ids, model, key
        self.fits += 1

    def _fit_in_background(self, index, config: RerankConfig, key) -> None:
        t0 = time.monotonic()
        try:
            ids, vectors = index.live_vectors()
            model = Diffusion(vectors, config.diffusion) if len(ids) >= 2 else None
            error = None
        except BaseException as e:  # noqa: BLE001  (handed to the next search that waits for a model)
            model, error = None, e
        took = time.monotonic() - t0
        with self._lock:
            if model is not None:
                self._install(ids, model, key)
            self._error = error
            self.last_fit_s = took
            self._next_fit = time.monotonic() + max(config.diffusion_refit_interval_s,
                                                    config.diffusion_refit_factor * took)
            self._fitting = None


def rerank_search(index, queries, k: int, method: Method = "none", *, space: str,
                  config: RerankConfig = RerankConfig(), cache: DiffusionCache | None = None, **params):
    """Search a GalleryIndex and re-rank: -> list (per query) of Hit lists."""
    from sdk.index import Hit

    if method not in RERANK_METHODS:
        raise SdkError(f"rerank must be one of {', '.join(RERANK_METHODS)}, got {method!r}")
    if method == "none":
        return index.search(queries, k, space=space, **params)
    if method in ("aqe", "alpha_qe"):
        n_exp = config.qe_k if method == "aqe" else config.alpha_qe_k
        alpha = 0.0 if method == "aqe" else config.alpha
        first, vecs = index.search_with_vectors(queries, n_exp, space=space, **params)
        q = l2_normalize(_as_rows(queries, "queries"))
        new_q = [expand(q[r:r + 1], v[None], np.array([[h.score for h in row]], np.float32), alpha)[0] if row else q[r]
                 for r, (row, v) in enumerate(zip(first, vecs))]  # a query without hits stays as it is
        return index.search(np.stack(new_q), k, space=space, **params)
    # diffusion
    if params.get("filter"):
        raise SdkError("diffusion re-ranking cannot filter by metadata; use rerank 'none', 'aqe' or 'alpha_qe'")
    q, k = index._prepare_query(queries, k, space)
    ids, model = (cache or DiffusionCache()).get(index, config)
    # The model may predate the latest changes (a background cache): over-fetch, drop deleted items.
    scores, idx = model.search(q, min(model.n, 2 * k))
    return [[Hit(ids[j], float(s)) for s, j in zip(srow, irow) if ids[j] in index][:k]
            for srow, irow in zip(scores, idx)]
