"""The figures `retrieval-sdk evaluate` reports for one set of query embeddings against the gallery.

mAP and Recall@k come from training.evaluate (numpy only, exact over the whole gallery); ranked lists come
from a faiss index over the gallery (exact 'Flat' by default) and give mP@10 (revisitop's definition,
training.evaluate.compute_map), the revisited E/M/H figures, the precision-recall curve and the result
grids. Everything runs in query chunks, so memory grows with the set, never with its square.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from sdk.errors import SdkError

KS = (1, 5, 10)  # Recall@k
MP_K = 10  # mP@10
RECALL_LEVELS = np.linspace(0.0, 1.0, 21)  # the precision-recall curve: interpolated precision at these
HIST_BINS = np.linspace(-1.0, 1.0, 101)  # cosine score histograms: 100 bins of 0.02
CHUNK = 256  # queries per block: a block's scores are CHUNK x gallery floats
RERANK_METHODS = ("aqe", "alpha-qe", "diffusion")


@dataclass
class SideResult:
    """One query-side embedding set against the gallery: the figures, and what the report draws."""

    metrics: dict  # json-ready: labelled {map, recall, mp_at_10}; revisited {easy|medium|hard: {map, mp_at_k}}
    aps: np.ndarray  # per query (revisited: medium), NaN where a query has no positive
    top_ids: np.ndarray  # (n_queries, grid_k) gallery positions, best first
    top_scores: np.ndarray
    precision: np.ndarray  # mean interpolated precision at RECALL_LEVELS
    hist_pos: np.ndarray  # score counts in HIST_BINS: positive pairs
    hist_neg: np.ndarray  # and negative pairs (junk and the query itself left out)

    @property
    def map(self) -> float:
        return headline_map(self.metrics)


def headline_map(metrics: dict) -> float:
    """The mAP a ratio is taken of: the medium setup's for the revisited protocol."""
    return metrics["medium"]["map"] if "medium" in metrics else metrics["map"]


class GallerySearch:
    """The gallery in a faiss index (sdk.vector_index, the one GalleryIndex uses): top-k by inner product."""

    def __init__(self, gallery: np.ndarray, factory: str = "Flat"):
        from sdk.index import IndexConfig
        from sdk.vector_index import VectorIndex, build_faiss_index

        self.config = IndexConfig(factory)
        index, self.factory = build_faiss_index(gallery.shape[1], factory, self.config.ef_construction)
        self.index = VectorIndex(index, gallery.shape[1])
        self.index.append(np.ascontiguousarray(gallery, np.float32))
        self.n = len(gallery)

    def search(self, queries: np.ndarray, k: int, self_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best gallery items per query; self_ids: leave each query's own item out."""
        c = self.config
        extra = 0 if self_ids is None else 1
        scores, ids = self.index.search(np.ascontiguousarray(queries, np.float32), k + extra, c.ef_search,
                                        c.nprobe, c.k_factor)
        if self_ids is not None:  # drop the query itself (or, where it is not listed, the last one)
            order = np.argsort(ids == self_ids[:, None], axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        if (ids < 0).any():
            raise SdkError(f"the '{self.factory}' index returned fewer than {k} results for some queries; use a "
                           "smaller --top-k or --index Flat")
        return scores, ids


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


def interpolated_precision(hits: np.ndarray, n_pos: int) -> np.ndarray:
    """Interpolated precision at RECALL_LEVELS of one ranked list (hits: True where a positive is listed);
    positives not in the list count as never retrieved."""
    cum = np.cumsum(hits)
    precision = cum / np.arange(1, len(hits) + 1)
    recall = cum / max(n_pos, 1)
    best = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at this rank or deeper
    at = np.searchsorted(recall, RECALL_LEVELS - 1e-12, side="left")
    out = np.zeros(len(RECALL_LEVELS))
    reached = at < len(recall)
    out[reached] = best[at[reached]]
    return out


def _histograms(queries: np.ndarray, gallery: np.ndarray, relation: Callable[[int, int], np.ndarray]):
    """Score counts of positive and negative pairs; relation(start, stop) -> int8 (rows, gallery):
    1 positive, 0 negative, -1 left out."""
    pos, neg = np.zeros(len(HIST_BINS) - 1, np.int64), np.zeros(len(HIST_BINS) - 1, np.int64)
    for start, stop in _chunks(len(queries)):
        s = np.clip(queries[start:stop] @ gallery.T, -1.0, 1.0)
        rel = relation(start, stop)
        pos += np.histogram(s[rel == 1], HIST_BINS)[0]
        neg += np.histogram(s[rel == 0], HIST_BINS)[0]
    return pos, neg


# ------------------------------------------------------------------------------------------ labelled sets
@dataclass(frozen=True)
class Labels:
    """Query and gallery labels; leave_one_out: the queries are the gallery, item for item."""

    query: np.ndarray
    gallery: np.ndarray
    leave_one_out: bool

    def n_positives(self) -> np.ndarray:
        classes, counts = np.unique(self.gallery, return_counts=True)
        where = np.searchsorted(classes, self.query)
        found = (where < len(classes)) & (classes[np.minimum(where, len(classes) - 1)] == self.query)
        n = np.where(found, counts[np.minimum(where, len(classes) - 1)], 0)
        return n - 1 if self.leave_one_out else n

    def relation(self, start: int, stop: int) -> np.ndarray:
        rel = (self.query[start:stop, None] == self.gallery[None, :]).astype(np.int8)
        if self.leave_one_out:
            rel[np.arange(stop - start), np.arange(start, stop)] = -1
        return rel


def _mp_at_10(ids: np.ndarray, labels: Labels, rows: np.ndarray, start: int, members: dict) -> np.ndarray:
    """revisitop's mP@10 of the listed queries `rows` (of a block starting at `start`)."""
    from training.evaluate import QueryGT, compute_map

    empty = np.zeros(0, np.int64)
    gnd = [QueryGT(members[labels.query[start + r]], empty) for r in rows]
    return compute_map(ids[rows], gnd, kappas=(MP_K,), n_db=len(labels.gallery)).p_at_k[:, 0]


def labelled_side(queries: np.ndarray, gallery: np.ndarray, labels: Labels, search: GallerySearch, top_k: int,
                  grid_k: int) -> SideResult:
    """mAP, Recall@1/5/10 (training.evaluate.labelled_eval), mP@10, PR curve, grids and histograms."""
    from training.evaluate import labelled_eval

    r = labelled_eval(queries, labels.query, gallery, labels.gallery, ks=KS, exclude_self=labels.leave_one_out,
                      chunk_size=CHUNK)
    n_q = len(queries)
    k = max(min(top_k, len(gallery) - labels.leave_one_out), min(MP_K, len(gallery) - labels.leave_one_out))
    members = {c: np.flatnonzero(labels.gallery == c) for c in np.unique(labels.gallery)}
    n_pos = labels.n_positives()
    p10 = np.full(n_q, np.nan)
    prec_sum, n_pr = np.zeros(len(RECALL_LEVELS)), 0
    top_ids = np.zeros((n_q, min(grid_k, k)), np.int64)
    top_scores = np.zeros(top_ids.shape, np.float32)
    for start, stop in _chunks(n_q):
        scores, ids = search.search(queries[start:stop], k, np.arange(start, stop) if labels.leave_one_out else None)
        top_ids[start:stop], top_scores[start:stop] = ids[:, :top_ids.shape[1]], scores[:, :top_ids.shape[1]]
        rows = np.flatnonzero(n_pos[start:stop] > 0)
        if rows.size:
            p10[start + rows] = _mp_at_10(ids, labels, rows, start, members)
            hits = labels.gallery[ids[rows]] == labels.query[start + rows, None]
            for row, h in zip(rows, hits):
                prec_sum += interpolated_precision(h, int(n_pos[start + row]))
            n_pr += rows.size
    pos, neg = _histograms(queries, gallery, labels.relation)
    metrics = {"map": r.map, "recall": {str(k): v for k, v in r.recall.items()},
               f"mp_at_{MP_K}": float(np.nanmean(p10)), "queries_evaluated": r.n_evaluated}
    return SideResult(metrics, r.aps, top_ids, top_scores, prec_sum / max(n_pr, 1), pos, neg)


# ------------------------------------------------------------------------------------------ revisited
def _revisited_metrics(ranks: np.ndarray, gt) -> tuple[dict, np.ndarray]:
    from training.evaluate import revisited_eval

    res = revisited_eval(ranks, gt, kappas=(1, 5, MP_K))
    metrics = {d: {"map": getattr(res, d).map,
                   "mp_at_k": {str(k): float(v) for k, v in zip(getattr(res, d).kappas, getattr(res, d).mp_at_k)}}
               for d in ("easy", "medium", "hard")}
    return metrics, res.medium.aps


def revisited_relation(gt) -> Callable[[int, int], np.ndarray]:
    """Medium setup: positives easy+hard, junk left out, everything else negative."""
    def relation(start: int, stop: int) -> np.ndarray:
        rel = np.zeros((stop - start, gt.n_db), np.int8)
        for r, q in enumerate(gt.gnd[start:stop]):
            rel[r, q.junk] = -1
            rel[r, np.concatenate([q.easy, q.hard])] = 1
        return rel
    return relation


def revisited_side(queries: np.ndarray, gallery: np.ndarray, gt, search: GallerySearch, top_k: int,
                   grid_k: int) -> SideResult:
    """E/M/H mAP and mP@k (training.evaluate.revisited_eval) on faiss-ranked lists; PR and grids: medium."""
    k = min(top_k, gt.n_db) if top_k > 0 else gt.n_db
    scores, ids = search.search(queries, k)
    metrics, aps = _revisited_metrics(ids, gt)
    prec_sum, n_pr = np.zeros(len(RECALL_LEVELS)), 0
    for row, q in zip(ids, gt.gnd):
        ok = np.concatenate([q.easy, q.hard])
        if ok.size:
            listed = row[~np.isin(row, q.junk)]
            prec_sum += interpolated_precision(np.isin(listed, ok), ok.size)
            n_pr += 1
    pos, neg = _histograms(queries, gallery, revisited_relation(gt))
    g = min(grid_k, k)
    return SideResult(metrics, aps, ids[:, :g], scores[:, :g], prec_sum / max(n_pr, 1), pos, neg)


# ------------------------------------------------------------------------------------------ re-ranking
class Reranker:
    """AQE / alpha-QE (sdk.rerank.expand on the faiss neighbours) and diffusion (sdk.rerank.Diffusion,
    fitted once on the gallery), scored by the same training.evaluate functions as the first ranking."""

    def __init__(self, gallery: np.ndarray, search: GallerySearch):
        from sdk.rerank import RerankConfig

        self.gallery, self.search, self.config = gallery, search, RerankConfig()
        self._diffusion = None

    def diffusion(self):
        from sdk.rerank import Diffusion

        if self._diffusion is None:
            n = len(self.gallery)
            if n > self.config.diffusion_max_items:
                raise SdkError(f"--rerank diffusion is limited to galleries of {self.config.diffusion_max_items} "
                               f"images (this one has {n}); use --rerank aqe or alpha-qe")
            self._diffusion = Diffusion(self.gallery, self.config.diffusion)
        return self._diffusion

    def expanded(self, method: str, queries: np.ndarray, leave_one_out: bool) -> np.ndarray:
        """The queries after (alpha-)query expansion with their nearest gallery items."""
        from sdk.rerank import expand

        k = self.config.qe_k if method == "aqe" else self.config.alpha_qe_k
        alpha = 0.0 if method == "aqe" else self.config.alpha
        out = np.empty_like(queries)
        for start, stop in _chunks(len(queries)):
            sims, ids = self.search.search(queries[start:stop], k, np.arange(start, stop) if leave_one_out else None)
            out[start:stop] = expand(queries[start:stop], self.gallery[ids], sims, alpha)
        return out

    def labelled(self, method: str, queries: np.ndarray, labels: Labels, top_k: int) -> dict:
        if method != "diffusion":
            return labelled_side(self.expanded(method, queries, labels.leave_one_out), self.gallery, labels,
                                 self.search, top_k, 1).metrics
        from training.evaluate import labelled_eval_scores

        model, lists = self.diffusion(), {}
        k = min(MP_K, len(self.gallery) - labels.leave_one_out)

        def blocks():
            for start, stop in _chunks(len(queries)):
                self_ids = np.arange(start, stop) if labels.leave_one_out else None
                s = model.rank_scores(queries[start:stop], self_ids=self_ids)
                if self_ids is not None:
                    s[np.arange(stop - start), self_ids] = -np.inf
                lists[start] = np.argsort(-s, axis=1, kind="stable")[:, :k]
                yield start, s

        r = labelled_eval_scores(blocks(), labels.query, labels.gallery, ks=KS, exclude_self=labels.leave_one_out)
        members = {c: np.flatnonzero(labels.gallery == c) for c in np.unique(labels.gallery)}
        n_pos = labels.n_positives()
        p10 = [(_mp_at_10(ids, labels, np.flatnonzero(n_pos[s:s + len(ids)] > 0), s, members))
               for s, ids in lists.items() if (n_pos[s:s + len(ids)] > 0).any()]
        return {"map": r.map, "recall": {str(k): v for k, v in r.recall.items()},
                f"mp_at_{MP_K}": float(np.mean(np.concatenate(p10))), "queries_evaluated": r.n_evaluated}

    def revisited(self, method: str, queries: np.ndarray, gt, top_k: int) -> dict:
        k = min(top_k, gt.n_db) if top_k > 0 else gt.n_db
        if method != "diffusion":
            return _revisited_metrics(self.search.search(self.expanded(method, queries, False), k)[1], gt)[0]
        from training.evaluate import ranks_from_scores

        ranks = np.concatenate([ranks_from_scores(self.diffusion().rank_scores(queries[a:b]))[:, :k]
                                for a, b in _chunks(len(queries))])
        return _revisited_metrics(ranks, gt)[0]
