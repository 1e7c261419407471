"""Retrieval evaluation: the revisited Oxford/Paris protocol, labelled-set mAP/Recall@k, asymmetric vs symmetric.

The revisited protocol (Radenović et al., CVPR 2018) is implemented once, here, to give the same numbers
as the revisitop reference `compute_map`; the labelled-set metrics serve datasets with class labels
(UKBench, Fashion-MNIST, ...). numpy only: evaluation must run where torch is not installed.
"""

from __future__ import annotations

import numbers
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from training.errors import TrainingError

Difficulty = Literal["easy", "medium", "hard"]
DIFFICULTIES: tuple[Difficulty, ...] = ("easy", "medium", "hard")
_GND_QUERY_KEYS = ("bbx", "easy", "hard", "junk")
_NORM_TOL = 1e-3  # how far from 1 an embedding's L2 norm may be (contract 3: embeddings are L2-normalised)


# ---------------------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryGT:
    """One query's relevant (`ok`) and ignored (`junk`) database indices for one evaluation setup."""

    ok: np.ndarray
    junk: np.ndarray


@dataclass(frozen=True)
class RevisitedQuery:
    """One query of a revisited dataset: its bounding box (x1, y1, x2, y2) and easy/hard/junk indices."""

    bbx: tuple[float, float, float, float]
    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


@dataclass(frozen=True)
class RevisitedGT:
    """A revisited ground-truth file: database image names, query image names and per-query labels."""

    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[RevisitedQuery]

    @property
    def n_db(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def setup(self, difficulty: Difficulty) -> list[QueryGT]:
        """Positives and junk per query for one setup, as the revisitop example builds them.

        Easy: ok=easy, junk=junk+hard. Medium: ok=easy+hard, junk=junk. Hard: ok=hard, junk=junk+easy.
        """
        if difficulty == "easy":
            return [QueryGT(q.easy, np.concatenate([q.junk, q.hard])) for q in self.gnd]
        if difficulty == "medium":
            return [QueryGT(np.concatenate([q.easy, q.hard]), q.junk) for q in self.gnd]
        if difficulty == "hard":
            return [QueryGT(q.hard, np.concatenate([q.junk, q.easy])) for q in self.gnd]
        raise TrainingError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")


def load_gnd(path: str | Path) -> RevisitedGT:
    """Read a revisitop `gnd_<dataset>.pkl` file (e.g. gnd_roxford5k.pkl) and check its structure.

    Pickle can run code when loaded: only read ground-truth files from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file {path} does not exist; expected a revisitop gnd_*.pkl file")
    try:
        with path.open("rb") as f:
            data = pickle.load(f)
    except Exception as exc:  # pickle raises many types for a file that is not a pickle
        raise TrainingError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc}); "
                         "expected a revisitop gnd_*.pkl file") from exc
    if not isinstance(data, Mapping):
        raise TrainingError(f"{path} holds a {type(data).__name__}, expected a dict with keys gnd, imlist, qimlist")
    missing = [k for k in ("gnd", "imlist", "qimlist") if k not in data]
    if missing:
        raise TrainingError(f"{path} lacks keys {missing}; a revisitop gnd file has keys gnd, imlist, qimlist")
    imlist, qimlist, raw_gnd = list(data["imlist"]), list(data["qimlist"]), list(data["gnd"])
    if len(raw_gnd) != len(qimlist):
        raise TrainingError(f"{path}: gnd has {len(raw_gnd)} entries but qimlist has {len(qimlist)}; "
                         "the file is inconsistent")
    n_db = len(imlist)
    gnd = [_read_gnd_query(entry, i, n_db, path) for i, entry in enumerate(raw_gnd)]
    name = path.stem[4:] if path.stem.startswith("gnd_") else path.stem
    return RevisitedGT(name=name, imlist=imlist, qimlist=qimlist, gnd=gnd)


def _read_gnd_query(entry: object, i: int, n_db: int, path: Path) -> RevisitedQuery:
    if not isinstance(entry, Mapping):
        raise TrainingError(f"{path}: gnd[{i}] is a {type(entry).__name__}, expected a dict with keys "
                         f"{list(_GND_QUERY_KEYS)}")
    missing = [k for k in _GND_QUERY_KEYS if k not in entry]
    if missing:
        hint = (" (this looks like an old-protocol ok/junk file; use the revisited gnd_r*.pkl)"
                if "ok" in entry else "")
        raise TrainingError(f"{path}: gnd[{i}] lacks keys {missing}{hint}")
    try:
        bbx = tuple(float(v) for v in entry["bbx"])
    except (TypeError, ValueError):
        bbx = ()
    if len(bbx) != 4:
        raise TrainingError(f"{path}: gnd[{i}]['bbx'] is {entry['bbx']!r}, expected 4 numbers (x1, y1, x2, y2)")
    lists = {k: _index_array(entry[k], f"{path}: gnd[{i}]['{k}']", n_db) for k in ("easy", "hard", "junk")}
    return RevisitedQuery(bbx=bbx, **lists)  # type: ignore[arg-type]


def _index_array(values: object, what: str, n_db: int | None) -> np.ndarray:
    """Database indices as a 1-D int64 array, checked to lie in range(n_db) when n_db is known."""
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TrainingError(f"{what} must be a 1-D list of integer database indices, got {arr.dtype} shape {arr.shape}")
    arr = arr.astype(np.int64)
    if n_db is not None and (arr.min() < 0 or arr.max() >= n_db):
        bad = arr[(arr < 0) | (arr >= n_db)][0]
        raise TrainingError(f"{what} holds index {bad}, out of range for a database of {n_db} images; "
                         "the ground truth does not belong to this database")
    return arr


def _as_query_gt(entry: QueryGT | Mapping, i: int, n_db: int) -> QueryGT:
    """Accept a QueryGT or a revisitop-style dict {'ok': ..., 'junk': ...} (junk optional)."""
    if isinstance(entry, QueryGT):
        ok, junk = entry.ok, entry.junk
    elif isinstance(entry, Mapping) and "ok" in entry:
        ok, junk = entry["ok"], entry.get("junk", [])
    else:
        raise TrainingError(f"gnd[{i}] must be a QueryGT or a dict with an 'ok' key, got {type(entry).__name__}; "
                         "for a RevisitedGT pass gt.setup('medium') (or use revisited_eval)")
    return QueryGT(_index_array(ok, f"gnd[{i}].ok", n_db), _index_array(junk, f"gnd[{i}].junk", n_db))


# ---------------------------------------------------------------------------------------------------------
# Rankings and the revisited protocol
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapResult:
    """mAP and mean precision@k over the queries that have positives; per-query values are NaN for the rest."""

    map: float
    aps: np.ndarray  # (n_queries,)
    mp_at_k: np.ndarray  # (len(kappas),)
    p_at_k: np.ndarray  # (n_queries, len(kappas))
    kappas: tuple[int, ...]
    n_evaluated: int  # queries with at least one positive


@dataclass(frozen=True)
class RevisitedResult:
    """The three setups of the revisited protocol for one ranking."""

    dataset: str
    easy: MapResult
    medium: MapResult
    hard: MapResult

    def summary(self) -> str:
        """Two lines in the revisitop example's format, values in percent rounded to 2 decimals."""
        name = self.dataset or "dataset"
        e, m, h = self.easy, self.medium, self.hard
        pct = lambda x: np.around(np.asarray(x) * 100, decimals=2)  # noqa: E731
        return (f">> {name}: mAP E: {pct(e.map)}, M: {pct(m.map)}, H: {pct(h.map)}\n"
                f">> {name}: mP@k{np.array(e.kappas)} E: {pct(e.mp_at_k)}, M: {pct(m.mp_at_k)}, "
                f"H: {pct(h.mp_at_k)}")


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """Rankings (n_queries, n_db) from similarities (n_queries, n_db): best first, ties in index order."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.dtype.kind not in "iuf":
        raise TrainingError(f"scores must be a 2-D real array (n_queries, n_db), got {scores.dtype} shape {scores.shape}")
    if scores.dtype.kind == "f" and np.isnan(scores).any():
        raise TrainingError("scores contain NaN; check the embeddings for NaN before ranking")
    # Stable ascending sort of the mirrored row, read backwards: descending, equal scores by ascending index.
    n_db = scores.shape[1]
    mirrored = np.argsort(scores[:, ::-1], axis=1, kind="stable")
    return (n_db - 1 - mirrored[:, ::-1]).astype(np.int64)


def compute_ap(positive_ranks: np.ndarray | Sequence[int], n_positives: int) -> float:
    """Average precision from the sorted 0-based ranks of the retrieved positives (junk already removed).

    Trapezoidal rule of revisitop: for the j-th positive at rank r, precision_0 = 1 if r == 0 else j / r,
    precision_1 = (j + 1) / (r + 1), and AP adds (precision_0 + precision_1) / 2 / n_positives.
    Positives missing from `positive_ranks` count as never retrieved.
    """
    ranks = np.asarray(positive_ranks)
    if ranks.size and (ranks.ndim != 1 or ranks.dtype.kind not in "iu"):
        raise TrainingError(f"positive_ranks must be a 1-D integer array, got {ranks.dtype} shape {ranks.shape}")
    if ranks.size and (ranks.min() < 0 or np.any(np.diff(ranks) < 0)):
        raise TrainingError("positive_ranks must be 0-based ranks sorted ascending (best first)")
    if n_positives < max(1, ranks.size):
        raise TrainingError(f"n_positives={n_positives} must be >= 1 and >= the {ranks.size} ranks given")
    return _ap(ranks.astype(np.int64), n_positives)


def _ap(ranks: np.ndarray, n_positives: int) -> float:
    j = np.arange(ranks.size, dtype=np.float64)
    r = ranks.astype(np.float64)
    precision_0 = np.divide(j, r, out=np.ones_like(j), where=r > 0)
    precision_1 = (j + 1) / (r + 1)
    return float(np.sum(precision_0 + precision_1) / (2.0 * n_positives))


def compute_map(ranks: np.ndarray, gnd: Sequence[QueryGT | Mapping],
                kappas: Sequence[int] = (1, 5, 10), n_db: int | None = None) -> MapResult:
    """mAP and mP@k of rankings, exactly as revisitop's `compute_map`.

    `ranks` is (n_queries, k): row i lists database indices best first for query i, each at most once.
    k may be less than the database size `n_db` (default: k, a full ranking): a top-k list from an ANN
    index scores as revisitop scores it, positives absent from the list count as never retrieved.
    revisitop uses the transposed (k, n_queries) layout: pass its ranks as `ranks.T`.
    Junk images are removed from each ranking; queries without positives get NaN and are not averaged.
    A query with positives none of which is in its list gets AP 0 and mP@k 0 (revisitop's reference
    fails on `max` of an empty array there).
    """
    ranks = _check_ranks(ranks, n_queries=len(gnd), n_db=n_db)
    n_q, k_list = ranks.shape
    n_db = k_list if n_db is None else n_db
    queries = [_as_query_gt(g, i, n_db) for i, g in enumerate(gnd)]
    kappas = _check_ks(kappas, "kappas", allow_empty=True)

    aps = np.full(n_q, np.nan)
    p_at_k = np.full((n_q, len(kappas)), np.nan)
    for i, q in enumerate(queries):
        if q.ok.size == 0:
            continue
        pos = np.flatnonzero(np.isin(ranks[i], q.ok))  # where the listed positives sit, ascending
        junk = np.flatnonzero(np.isin(ranks[i], q.junk))
        pos = pos - np.searchsorted(junk, pos, side="left")  # minus the junk ranked before each positive
        aps[i] = _ap(pos, q.ok.size)  # revisitop divides by len(ok), duplicates included
        if pos.size == 0:
            p_at_k[i] = 0.0
            continue
        pos1 = pos + 1
        for j, kappa in enumerate(kappas):
            kq = min(int(pos1.max()), kappa)
            p_at_k[i, j] = np.count_nonzero(pos1 <= kq) / kq

    valid = ~np.isnan(aps)
    if not valid.any():
        raise TrainingError("no query has a positive image: nothing to evaluate (check the gnd / difficulty setup)")
    return MapResult(map=float(aps[valid].mean()), aps=aps, mp_at_k=p_at_k[valid].mean(axis=0), p_at_k=p_at_k,
                     kappas=kappas, n_evaluated=int(valid.sum()))


def revisited_eval(ranks: np.ndarray, gt: RevisitedGT, kappas: Sequence[int] = (1, 5, 10)) -> RevisitedResult:
    """Easy, Medium and Hard mAP / mP@k of rankings (n_queries, k) on a revisited dataset, k <= n_db.

    A full ranking (k = n_db) or a top-k list; see `compute_map` for how a top-k list is scored.
    """
    ranks = _check_ranks(ranks, n_queries=gt.n_queries, n_db=gt.n_db, what=gt.name or "the dataset")
    results = {d: compute_map(ranks, gt.setup(d), kappas, n_db=gt.n_db) for d in DIFFICULTIES}
    return RevisitedResult(dataset=gt.name, **results)


def _check_ranks(ranks: np.ndarray, n_queries: int, n_db: int | None = None,
                 what: str = "the database") -> np.ndarray:
    """Rankings (n_queries, k) of distinct database ids in range(n_db); n_db None means a full ranking."""
    ranks = np.asarray(ranks)
    if ranks.dtype.kind not in "iu":
        raise TrainingError(f"ranks must be an integer array of database indices, got {ranks.dtype}; "
                         "for similarity scores use ranks_from_scores(scores)")
    if ranks.ndim != 2:
        raise TrainingError(f"ranks must be 2-D (n_queries, k), got shape {ranks.shape}")
    if ranks.shape[0] != n_queries:
        hint = " (revisitop's layout is (k, n_queries): pass ranks.T)" if ranks.shape[1] == n_queries else ""
        raise TrainingError(f"ranks has shape {ranks.shape} but there are {n_queries} queries; "
                         f"expected (n_queries, k), one row per query{hint}")
    k = ranks.shape[1]
    n_db = k if n_db is None else n_db
    if k == 0:
        raise TrainingError("ranks has no columns: each query needs at least one ranked database index")
    if k > n_db:
        raise TrainingError(f"ranks list {k} ids per query but {what} has {n_db} images; "
                         "k must be <= the database size")
    out = np.flatnonzero((ranks < 0).any(axis=1) | (ranks >= n_db).any(axis=1))
    if out.size:
        row = ranks[out[0]]
        bad = row[(row < 0) | (row >= n_db)][0]
        raise TrainingError(f"ranks row {out[0]} holds id {bad}, out of range for {what} of {n_db} images; "
                         "ids are 0-based database indices")
    sorted_rows = np.sort(ranks, axis=1)
    dup = np.flatnonzero((sorted_rows[:, 1:] == sorted_rows[:, :-1]).any(axis=1))
    if dup.size:
        row = sorted_rows[dup[0]]
        bad = row[1:][row[1:] == row[:-1]][0]
        raise TrainingError(f"ranks row {dup[0]} lists id {bad} more than once; each database index may "
                         "appear at most once per query, best first")
    return ranks.astype(np.int64, copy=False)


def _check_ks(ks: Sequence[int], what: str, allow_empty: bool = False) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks and not allow_empty:
        raise TrainingError(f"{what} must list at least one k")
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise TrainingError(f"{what} must be positive integers, got {ks}")
    return tuple(int(k) for k in ks)


# ---------------------------------------------------------------------------------------------------------
# Labelled sets: positives are gallery items with the query's label
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledResult:
    """mAP and Recall@k over queries that have at least one positive in the gallery (others are NaN)."""

    map: float
    aps: np.ndarray  # (n_queries,), NaN for a query without positives
    recall: dict[int, float]  # k -> fraction of queries with a positive among their top k
    n_evaluated: int


class _PositiveRanks(NamedTuple):
    aps: np.ndarray
    first_hit: np.ndarray  # 0-based rank of the first positive, -1 without positives


def labelled_eval(query_emb: np.ndarray, query_labels: np.ndarray, gallery_emb: np.ndarray,
                  gallery_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10), exclude_self: bool = False,
                  chunk_size: int = 1024) -> LabelledResult:
    """mAP and Recall@k of inner-product search, positives = gallery items sharing the query's label.

    AP is the standard non-interpolated one (mean over positives of precision at their rank), not
    revisitop's trapezoid. Equal scores rank in gallery index order. exclude_self: the queries are the
    gallery (leave-one-out), so query i never retrieves gallery item i.
    """
    ks = _check_ks(ks, "ks")
    q = _check_embeddings(query_emb, "query")
    g = _check_embeddings(gallery_emb, "gallery")
    if q.shape[1] != g.shape[1]:
        raise TrainingError(f"query embedding dim {q.shape[1]} != gallery dim {g.shape[1]}: "
                         "the models are not in one embedding space")
    if chunk_size < 1:
        raise TrainingError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = ((start, q[start:start + chunk_size] @ g.T) for start in range(0, q.shape[0], chunk_size))
    return _labelled_result(_positive_ranks(chunks, query_labels, gallery_labels, q.shape[0], g.shape[0],
                                            exclude_self), ks)


def labelled_eval_scores(scores: np.ndarray | Iterable[tuple[int, np.ndarray]], query_labels: np.ndarray,
                         gallery_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                         exclude_self: bool = False) -> LabelledResult:
    """`labelled_eval` from similarity scores instead of embeddings (re-ranked scores, e.g. diffusion's):
    an (n_queries, n_gallery) array, or (first query row, score rows) chunks covering every query in order
    (so a large set never holds the whole matrix)."""
    ks = _check_ks(ks, "ks")
    n_q, n_g = np.shape(query_labels)[0], np.shape(gallery_labels)[0]
    if isinstance(scores, np.ndarray):
        if scores.shape != (n_q, n_g):
            raise TrainingError(f"scores have shape {scores.shape}, expected ({n_q}, {n_g}): one row per query, "
                             "one column per gallery item")
        scores = [(0, scores)]
    return _labelled_result(_positive_ranks(scores, query_labels, gallery_labels, n_q, n_g, exclude_self), ks)


def _labelled_result(ranked: _PositiveRanks, ks: tuple[int, ...]) -> LabelledResult:
    valid = ~np.isnan(ranked.aps)
    if not valid.any():
        raise TrainingError("no query has a positive in the gallery (no label is shared): nothing to evaluate")
    first = ranked.first_hit[valid]
    recall = {k: float(np.mean(first < k)) for k in ks}
    return LabelledResult(map=float(ranked.aps[valid].mean()), aps=ranked.aps, recall=recall,
                          n_evaluated=int(valid.sum()))


def format_table(rows: Sequence[Mapping], columns: Sequence[tuple], title: str, width: int) -> str:
    """A run's results table: `title` over each row's "run", then a column per (key, heading, width, format
    spec, scale); a value that is no number prints "-", and a resumed row's "seconds" "resumed"."""
    lines = [f"{title:{width}s}" + "".join(f"{heading:>{w}s}" for _, heading, w, _, _ in columns)]
    for r in rows:
        cells = []
        for key, _, w, spec, scale in columns:
            v = r.get(key)
            if key == "seconds" and r.get("resumed"):  # trained earlier: this command's seconds would be a replay's
                cells.append(f"{'resumed':>{w}s}")
            elif isinstance(v, numbers.Real) and not isinstance(v, bool):  # numpy floats too
                cells.append(f"{v * scale:{w}{spec}}")
            else:
                cells.append(f"{'-':>{w}s}")
        lines.append(f"{r['run']:{width}s}" + "".join(cells))
    return "\n".join(lines)


def class_map(query_emb: np.ndarray, query_labels: np.ndarray, gallery_emb: np.ndarray,
              gallery_labels: np.ndarray, exclude_self: bool = False, chunk_size: int = 1024) -> float:
    """Mean AP where positives share the query's label; queries without positives are left out."""
    return labelled_eval(query_emb, query_labels, gallery_emb, gallery_labels, ks=(1,),
                         exclude_self=exclude_self, chunk_size=chunk_size).map


def recall_at_k(query_emb: np.ndarray, query_labels: np.ndarray, gallery_emb: np.ndarray,
                gallery_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10), exclude_self: bool = False,
                chunk_size: int = 1024) -> dict[int, float]:
    """Fraction of queries (with positives) that find a same-label item among their top k, for each k."""
    return labelled_eval(query_emb, query_labels, gallery_emb, gallery_labels, ks=ks,
                         exclude_self=exclude_self, chunk_size=chunk_size).recall


def _positive_ranks(score_chunks: Iterable[tuple[int, np.ndarray]], query_labels, gallery_labels, n_q: int,
                    n_g: int, exclude_self: bool) -> _PositiveRanks:
    """Rank every query's positives without a full argsort: a sorted copy of each score row and a
    binary search give how many items score higher (np.sort is several times faster than argsort);
    rows where a positive ties with another item fall back to a stable argsort to break ties by index."""
    q_labels = _check_labels(query_labels, n_q, "query")
    g_labels = _check_labels(gallery_labels, n_g, "gallery")
    if exclude_self:
        if n_q != n_g or not np.array_equal(q_labels, g_labels):
            raise TrainingError(f"exclude_self needs the queries to be the gallery itself (same items, same labels); "
                             f"got {n_q} queries and {n_g} gallery items")

    aps = np.full(n_q, np.nan)
    first_hit = np.full(n_q, -1, dtype=np.int64)
    covered = 0
    for start, scores in score_chunks:
        scores = np.array(scores, dtype=np.float32)  # a copy: exclude_self writes into it
        stop = start + scores.shape[0]
        if start != covered or scores.ndim != 2 or scores.shape[1] != n_g or stop > n_q:
            raise TrainingError(f"score chunk for queries {start}..{stop} of shape {scores.shape} does not continue "
                             f"the rows before it (next row {covered}, {n_g} gallery items, {n_q} queries)")
        if np.isnan(scores).any():
            raise TrainingError("scores contain NaN; check the embeddings for NaN before ranking")
        covered = stop
        is_pos = q_labels[start:stop, None] == g_labels[None, :]
        if exclude_self:
            rows, selves = np.arange(stop - start), np.arange(start, stop)
            scores[rows, selves] = -np.inf  # ranks after everything, so it shifts no one
            is_pos[rows, selves] = False
        ascending = np.sort(scores, axis=1)
        for r in range(stop - start):
            pos_idx = np.flatnonzero(is_pos[r])
            if pos_idx.size == 0:
                continue
            pos_scores = scores[r, pos_idx]
            n_above = n_g - np.searchsorted(ascending[r], pos_scores, side="right")
            n_at_or_above = n_g - np.searchsorted(ascending[r], pos_scores, side="left")
            if np.any(n_at_or_above - n_above > 1):  # a positive ties with another item
                order = np.argsort(-scores[r], kind="stable")
                where = np.empty(n_g, dtype=np.int64)
                where[order] = np.arange(n_g)
                pos_ranks = np.sort(where[pos_idx])
            else:
                pos_ranks = np.sort(n_above)
            aps[start + r] = np.mean(np.arange(1, pos_ranks.size + 1) / (pos_ranks + 1.0))
            first_hit[start + r] = pos_ranks[0]
    if covered != n_q:
        raise TrainingError(f"the score chunks cover {covered} of {n_q} queries; give one row per query")
    return _PositiveRanks(aps, first_hit)


def _check_embeddings(emb: np.ndarray, what: str) -> np.ndarray:
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.dtype.kind not in "f" or emb.shape[0] == 0:
        raise TrainingError(f"{what} embeddings must be a non-empty 2-D float array (n, dim), "
                         f"got {emb.dtype} shape {emb.shape}")
    emb = emb.astype(np.float32, copy=False)
    if not np.isfinite(emb).all():
        raise TrainingError(f"{what} embeddings contain NaN or inf; check the model output")
    norms = np.linalg.norm(emb, axis=1)
    if np.any(np.abs(norms - 1.0) > _NORM_TOL):
        raise TrainingError(f"{what} embeddings are not L2-normalised (row norms {norms.min():.4g}..{norms.max():.4g}); "
                         "divide each row by its norm first")
    return emb


def _check_labels(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise TrainingError(f"{what} labels must be 1-D with one label per embedding ({n}), got shape {labels.shape}")
    return labels


# ---------------------------------------------------------------------------------------------------------
# Asymmetric retrieval: query model on the queries, gallery model on the gallery
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AsymmetricResult:
    """Asymmetric (query model -> gallery model) next to symmetric (gallery model both sides) retrieval."""

    asym_map: float
    asym_recall_at_1: float
    sym_map: float | None  # None when no gallery-model query embeddings were given
    sym_recall_at_1: float | None
    n_queries: int  # queries with at least one positive
    dim: int

    @property
    def ratio(self) -> float | None:
        """asym_map / sym_map: how much of the gallery model's own accuracy the query model keeps."""
        return None if self.sym_map is None else self.asym_map / self.sym_map

    def summary(self) -> str:
        text = f"asymmetric mAP {self.asym_map * 100:.2f}, R@1 {self.asym_recall_at_1 * 100:.2f}"
        if self.sym_map is not None:
            text += (f" | symmetric mAP {self.sym_map * 100:.2f}, R@1 {self.sym_recall_at_1 * 100:.2f}"
                     f" | asym/sym {self.ratio:.3f}")
        return text + f" ({self.n_queries} queries, dim {self.dim})"


def asymmetric_eval(query_emb_q: np.ndarray, gallery_emb_g: np.ndarray, query_labels: np.ndarray,
                    gallery_labels: np.ndarray, query_emb_g: np.ndarray | None = None,
                    exclude_self: bool = False, chunk_size: int = 1024) -> AsymmetricResult:
    """Evaluate the query model against the gallery model's index, and (with `query_emb_g`, the gallery
    model's embeddings of the same queries) the gallery model alone, so the gap is visible at a glance."""
    asym = labelled_eval(query_emb_q, query_labels, gallery_emb_g, gallery_labels, ks=(1,),
                         exclude_self=exclude_self, chunk_size=chunk_size)
    sym = None
    if query_emb_g is not None:
        n_q, n_qg = np.shape(query_emb_q)[0], np.shape(query_emb_g)[0]
        if n_q != n_qg:
            raise TrainingError(f"query_emb_g has {n_qg} rows but query_emb_q has {n_q}: both must embed the same queries")
        sym = labelled_eval(query_emb_g, query_labels, gallery_emb_g, gallery_labels, ks=(1,),
                            exclude_self=exclude_self, chunk_size=chunk_size)
    return AsymmetricResult(
        asym_map=asym.map, asym_recall_at_1=asym.recall[1],
        sym_map=None if sym is None else sym.map, sym_recall_at_1=None if sym is None else sym.recall[1],
        n_queries=asym.n_evaluated, dim=int(np.shape(gallery_emb_g)[1]),
    )
