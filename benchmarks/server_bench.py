"""Gallery-service benchmark over loopback: p50/p99 latency and QPS of POST /v1/search (k=10) with
concurrent clients, against a real `retrieval-sdk serve` process.

    python benchmarks/server_bench.py                        # 100k x 512 HNSW32, 8 clients, 20 s
    python benchmarks/server_bench.py --n 1000000 --config HNSW32 --index /path/to/keep
    python benchmarks/server_bench.py --clients 4 --with-writes   # + the same run under writes and compaction

Setup (not timed): a bundle with a 512-d tiny model (export/, needs the train extra), an index of N
clustered vectors written with GalleryIndex, then the server in a subprocess on 127.0.0.1. Each client
is its own process (no shared GIL) with one keep-alive connection, sending one query at a time.

--with-writes: after the search-only run, the same clients search again while a writer process replaces
gallery items at --write-rate items/s (each replacement leaves a tombstone) and another process keeps a
compaction running through POST /v1/index/compact; the p99 of both runs and their ratio are printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from index_bench import generator, sample  # noqa: E402

SPACE = "bench-space"


def make_bundle(out: Path, dim: int) -> Path:
    from export.bundle import export_bundle
    from training.models import CheckpointMeta, EmbeddingModel, ModelConfig, save_checkpoint

    for role in ("query", "gallery"):
        save_checkpoint(EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=dim)), out / f"{role}.pt",
                        CheckpointMeta(embedding_space=SPACE, role=role))
    export_bundle(out / "query.pt", out / "bundle", gallery_checkpoint=out / "gallery.pt")
    return out / "bundle"


def build_index(path: Path, n: int, config: str, centres: np.ndarray, basis: np.ndarray) -> None:
    from sdk.index import GalleryIndex, IndexConfig

    d = basis.shape[1]
    x = sample(n, centres, basis, 1.0, 0.3, np.random.default_rng(1))
    t0 = time.perf_counter()
    with GalleryIndex.create(path, d, SPACE, IndexConfig(config, checkpoint_every=0)) as idx:
        for s in range(0, n, 50_000):
            idx.add([f"item-{i}" for i in range(s, min(s + 50_000, n))], x[s:s + 50_000], space=SPACE,
                    metadata=[{"n": i} for i in range(s, min(s + 50_000, n))])
    print(f"index: {n} x {d} {config} built in {time.perf_counter() - t0:.0f} s", flush=True)


def client(url: str, queries: np.ndarray, k: int, encoding: str, start: float, stop: float, seed: int, out) -> None:
    import httpx

    rng = np.random.default_rng(seed)
    lat, took, errors = [], [], 0
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < stop:
            q = queries[rng.integers(len(queries))]
            body = {"space": SPACE, "k": k}
            if encoding == "json":
                body["embedding"] = q.tolist()
            else:
                body["embedding_b64"] = base64.b64encode(q.tobytes()).decode()
            t0 = time.perf_counter()
            r = http.post("/v1/search", json=body)
            dt = time.perf_counter() - t0
            if r.status_code == 200:
                lat.append(dt)
                took.append(r.json()["took_ms"])
            else:
                errors += 1
    out.put((lat, took, errors))


def writer(url: str, ids: list[str], vectors: np.ndarray, rate: float, start: float, stop: float, out) -> None:
    """Replace items (batches of 50, base64) at `rate` items/s; deletes and re-adds a few each batch."""
    import httpx

    rng = np.random.default_rng(7)
    sent, errors, lat = 0, 0, []
    with httpx.Client(base_url=url, timeout=60) as http:
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < stop:
            pick = rng.choice(len(ids), 50, replace=False)
            items = [{"id": ids[j], "embedding_b64": base64.b64encode(vectors[j].tobytes()).decode(),
                      "metadata": {"n": int(j)}} for j in pick]
            t0 = time.perf_counter()
            r = http.post("/v1/items", json={"space": SPACE, "items": items})
            ok = r.status_code == 200
            for j in pick[:3]:
                ok &= http.delete(f"/v1/items/{ids[j]}").status_code == 200
            lat.append(time.perf_counter() - t0)
            sent, errors = sent + 50, errors + (not ok)
            time.sleep(max(0.0, sent / rate - (time.time() - start)))
    out.put(("writer", sent, errors, lat))


def compactor(url: str, start: float, stop: float, out) -> None:
    """Keep a compaction running: POST /v1/index/compact again as soon as the last one returns."""
    import httpx

    runs, dropped, seconds = 0, 0, []
    with httpx.Client(base_url=url, timeout=600) as http:
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < stop:
            t0 = time.perf_counter()
            r = http.post("/v1/index/compact").json()
            seconds.append(time.perf_counter() - t0)
            runs, dropped = runs + 1, dropped + r["dropped"]
            if r["dropped"] == 0:
                time.sleep(0.2)
    out.put(("compactor", runs, dropped, seconds))


def summarise(results: list, seconds: float) -> dict:
    lat = np.concatenate([np.asarray(r[0]) for r in results]) * 1000
    took = np.concatenate([np.asarray(r[1]) for r in results])
    return {"requests": int(len(lat)), "errors": int(sum(r[2] for r in results)),
            "qps": round(len(lat) / seconds, 1),
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 3), "p90": round(float(np.percentile(lat, 90)), 3),
                           "p99": round(float(np.percentile(lat, 99)), 3), "mean": round(float(lat.mean()), 3)},
            "server_search_ms": {"p50": round(float(np.percentile(took, 50)), 3),
                                 "p99": round(float(np.percentile(took, 99)), 3)}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--config", default="HNSW32")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--encoding", choices=("b64", "json"), default="b64")
    ap.add_argument("--index", type=Path, default=None, help="reuse/keep the index here (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX/faiss threads of the server")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--with-writes", action="store_true",
                    help="also run the clients under writes + a running compaction and print the p99 ratio")
    ap.add_argument("--write-rate", type=float, default=500.0, help="items replaced per second (--with-writes)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="server_bench_"))
    bundle = make_bundle(work, args.d)
    index = args.index or work / "index"
    centres, basis = generator(args.d, max(100, args.n // 100), 64)
    if not (index / "index.sqlite").exists():
        build_index(index, args.n, args.config, centres, basis)
    queries = sample(2000, centres, basis, 1.0, 0.3, np.random.default_rng(2))  # not in the gallery
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-c", "from sdk.cli import app; app()", "serve", "--bundle", str(bundle), "--index",
           str(index), "--port", str(port), "--threads", str(args.threads)]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise SystemExit("server did not start")
        items = httpx.get(url + "/healthz").json()["items"]
        # warm-up (connections, caches), then the timed run(s)
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        phases = [("warm-up", 2.0), ("search only", args.seconds)]
        if args.with_writes:
            phases.append(("with writes and compaction", args.seconds))
        runs = {}
        for phase, seconds in phases:
            start = time.time() + 1.0
            procs = [ctx.Process(target=client, args=(url, queries, args.k, args.encoding, start, start + seconds, i, out))
                     for i in range(args.clients)]
            if phase.startswith("with writes"):
                rows = np.random.default_rng(3).choice(items, min(items, 20_000), replace=False)
                fresh = sample(len(rows), centres, basis, 1.0, 0.3, np.random.default_rng(4))
                procs += [ctx.Process(target=writer, args=(url, [f"item-{j}" for j in rows], fresh, args.write_rate,
                                                           start, start + seconds, out)),
                          ctx.Process(target=compactor, args=(url, start, start + seconds, out))]
            for p in procs:
                p.start()
            got = [out.get() for _ in procs]
            for p in procs:
                p.join()
            runs[phase] = {**summarise([r for r in got if not isinstance(r[0], str)], seconds),
                           **{r[0]: {"items" if r[0] == "writer" else "runs": r[1],
                                     "errors" if r[0] == "writer" else "dropped": r[2],
                                     "seconds_p50": round(float(np.median(r[3])), 3) if r[3] else None,
                                     "seconds_max": round(float(np.max(r[3])), 3) if r[3] else None}
                              for r in got if isinstance(r[0], str)}}
        base = runs["search only"]
        report = {
            "items": items, "d": args.d, "config": args.config, "clients": args.clients, "k": args.k,
            "encoding": args.encoding, "seconds": args.seconds, **base, "cpus": os.cpu_count(),
        }
        if args.with_writes:
            report["with_writes"] = runs["with writes and compaction"]
        print(json.dumps(report, indent=2))
        print(f"p99 {report['latency_ms']['p99']:.1f} ms (target <= 20 ms for k=10): "
              f"{'met' if report['latency_ms']['p99'] <= 20 else 'NOT met'}")
        if args.with_writes:
            loaded = report["with_writes"]
            print(f"search p99 with {args.clients} clients: {base['latency_ms']['p99']:.1f} ms search only, "
                  f"{loaded['latency_ms']['p99']:.1f} ms with writes ({loaded['writer']['items']} items replaced) and "
                  f"{loaded['compactor']['runs']} compactions ({loaded['compactor']['dropped']} tombstones dropped); "
                  f"ratio {loaded['latency_ms']['p99'] / base['latency_ms']['p99']:.2f}; errors "
                  f"{base['errors']} / {loaded['errors']}")
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
