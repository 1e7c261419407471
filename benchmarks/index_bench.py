"""GalleryIndex benchmark on N x D clustered vectors (default 1M x 512): HNSW and IVF-PQ + exact refine
against exact (Flat) search in the same run.

Reports recall@10 against exact search and single-query latency (one query per call, as a server
issues them), both as absolute numbers and as a speed-up over exact search. Every index is driven
through GalleryIndex (in-memory), so the latencies include the SDK's own overhead.

    python benchmarks/index_bench.py                       # 1M x 512, ~15 min on 2 cores
    python benchmarks/index_bench.py --n 100000 --out r.json

Memory: the vectors (N*D*4 bytes, 2 GB at 1M x 512) plus one index at a time (about the same again).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdk.index import GalleryIndex, IndexConfig  # noqa: E402

SPACE = "bench"


def generator(d: int, n_clusters: int, intrinsic: int, seed: int = 0):
    """Cluster centres and a shared low-dimensional variation basis (real embeddings vary along far
    fewer directions than they have dimensions)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((d, intrinsic)))[0].T.astype(np.float32)  # (intrinsic, d) orthonormal
    return centres, basis


def sample(n: int, centres: np.ndarray, basis: np.ndarray, spread: float, iso: float, rng,
           chunk: int = 100_000) -> np.ndarray:
    """Points = centre + spread * (variation in the shared subspace) + iso * (isotropic noise), L2-normalised.
    Both noise terms have expected norm `spread` and `iso`. Generated in chunks (one copy in memory)."""
    m, d = basis.shape
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        x = centres[rng.integers(0, len(centres), k)]
        x = x + (rng.standard_normal((k, m)).astype(np.float32) * (spread / np.sqrt(m))) @ basis
        x += rng.standard_normal((k, d)).astype(np.float32) * (iso / np.sqrt(d))
        out[s:s + k] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def build(factory: str, x: np.ndarray, **knobs) -> tuple[GalleryIndex, float]:
    cfg = IndexConfig(factory, train_size=min(len(x), knobs.pop("train_size", 100_000)), checkpoint_every=0, **knobs)
    idx = GalleryIndex.create(None, x.shape[1], SPACE, cfg)
    t0 = time.perf_counter()
    step = 100_000
    for s in range(0, len(x), step):
        idx.add([str(i) for i in range(s, min(s + step, len(x)))], x[s:s + step], space=SPACE)
    return idx, time.perf_counter() - t0


def single_query_ms(idx: GalleryIndex, queries: np.ndarray, k: int = 10, **params) -> tuple[float, np.ndarray]:
    """Median latency (ms) of one-query searches, and the labels found."""
    idx.search_labels(queries[:2], k, space=SPACE, **params)  # warm-up
    times, labels = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, lab = idx.search_labels(q, k, space=SPACE, **params)
        times.append(time.perf_counter() - t0)
        labels.append(lab[0])
    return float(np.median(times) * 1000), np.stack(labels)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--spread", type=float, default=1.0, help="variation norm around a centre, in the shared subspace")
    ap.add_argument("--intrinsic", type=int, default=64, help="dimension of the shared variation subspace")
    ap.add_argument("--iso", type=float, default=0.3, help="isotropic noise norm on top (all d dimensions)")
    ap.add_argument("--queries", type=int, default=500, help="queries for recall and approximate latency")
    ap.add_argument("--exact-queries", type=int, default=50, help="queries timed one by one on exact search")
    ap.add_argument("--hnsw", default="HNSW32")
    ap.add_argument("--ef-construction", type=int, default=IndexConfig.ef_construction, help="HNSW build breadth")
    ap.add_argument("--ivfpq", default="IVF1024,PQ64")
    ap.add_argument("--skip-hnsw", action="store_true")
    ap.add_argument("--skip-ivfpq", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import faiss

    report = {"n": args.n, "d": args.d, "clusters": args.clusters, "queries": args.queries,
              "data": {"spread": args.spread, "intrinsic": args.intrinsic, "iso": args.iso},
              "hnsw_ef_construction": args.ef_construction,
              "machine": f"{platform.machine()}, {faiss.omp_get_max_threads()} threads, faiss {faiss.__version__}",
              "results": []}
    t_all = time.perf_counter()
    centres, basis = generator(args.d, args.clusters, args.intrinsic)
    x = sample(args.n, centres, basis, args.spread, args.iso, np.random.default_rng(1))
    q = sample(args.queries, centres, basis, args.spread, args.iso, np.random.default_rng(2))  # not in the gallery
    print(f"data: {args.n} x {args.d} in {args.clusters} clusters (variation {args.spread} in {args.intrinsic} dims "
          f"+ {args.iso} isotropic), {args.queries} queries "
          f"({time.perf_counter() - t_all:.0f} s)", flush=True)

    # exact: ground truth (batched) and single-query latency (one by one)
    flat, t_build = build("Flat", x)
    t0 = time.perf_counter()
    _, truth = flat.search_labels(q, 100, space=SPACE)
    t_batch = time.perf_counter() - t0
    exact_ms, _ = single_query_ms(flat, q[: args.exact_queries])
    print(f"exact: {exact_ms:.2f} ms/query one by one; batched ground truth {t_batch:.1f} s", flush=True)
    report["exact"] = {"ms_per_query": exact_ms, "batched_s_per_1000": t_batch / len(q) * 1000}
    del flat
    gc.collect()

    def record(name, factory, build_s, params, ms, found):
        r = {"index": name, "factory": factory, "params": params, "build_s": round(build_s, 1),
             "recall@10": round(recall_at(found, truth), 4), "ms_per_query": round(ms, 4),
             "speedup_vs_exact": round(exact_ms / ms, 1)}
        report["results"].append(r)
        print(f"{name:8s} {json.dumps(params):38s} recall@10 {r['recall@10']:.4f}  {ms:7.3f} ms/query  "
              f"x{r['speedup_vs_exact']:.0f} vs exact", flush=True)

    if not args.skip_hnsw:
        idx, build_s = build(args.hnsw, x, ef_construction=args.ef_construction)
        print(f"{args.hnsw} built in {build_s:.0f} s", flush=True)
        for ef in (32, 64, 128, 256, 512):
            ms, found = single_query_ms(idx, q, ef_search=ef)
            record("HNSW", args.hnsw, build_s, {"ef_search": ef}, ms, found)
        del idx
        gc.collect()

    if not args.skip_ivfpq:
        idx, build_s = build(args.ivfpq, x)
        factory = idx.stats().factory
        print(f"{factory} built (trained on {min(args.n, 100_000)}) in {build_s:.0f} s", flush=True)
        for nprobe, k_factor in ((16, 4), (32, 4), (32, 8), (64, 8), (128, 16)):
            ms, found = single_query_ms(idx, q, nprobe=nprobe, k_factor=k_factor)
            record("IVF-PQ", factory, build_s, {"nprobe": nprobe, "k_factor": k_factor}, ms, found)
        del idx
        gc.collect()

    report["total_s"] = round(time.perf_counter() - t_all, 1)
    ok = [r for r in report["results"] if r["recall@10"] >= 0.95 and r["speedup_vs_exact"] >= 20]
    report["target_met_by"] = [f"{r['index']} {r['params']}" for r in ok]
    print(f"targets (recall@10 >= 0.95 at >= 20x exact): met by {report['target_met_by'] or 'none'}; "
          f"total {report['total_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
