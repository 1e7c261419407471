"""Durability: every add or delete the server acknowledged before a kill -9 is there after a restart,
through several crash/restart cycles that land anywhere (mid-request, mid-snapshot); a corrupt
index gives a one-line error, not a crash."""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest

from .conftest import CLI, ROOT, SPACE, server_process, unit


def writer(url: str, prefix: str, vectors: np.ndarray, acked_add: dict, acked_del: set, stop: threading.Event,
           seed: int) -> None:
    """Add items one request at a time (sometimes two per request) and delete some earlier ones,
    recording exactly what the server acknowledged."""
    rng = random.Random(seed)
    mine: list[str] = []  # this writer's live acknowledged ids (the shared dict is not iterated)
    i = 0
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set() and i < len(vectors) - 1:
            n = rng.choice((1, 1, 2))
            ids = [f"{prefix}-{i + j}" for j in range(n)]
            items = [{"id": item, "embedding_b64": base64.b64encode(vectors[i + j].tobytes()).decode()}
                     for j, item in enumerate(ids)]
            try:
                r = http.post("/v1/items", json={"space": SPACE, "items": items})
            except httpx.TransportError:
                return  # the server died mid-request: this add was never acknowledged
            if r.status_code == 200:
                for j, item in enumerate(ids):
                    acked_add[item] = i + j
                    mine.append(item)
            i += n
            if mine and rng.random() < 0.15:
                victim = mine.pop(rng.randrange(len(mine)))
                try:
                    r = http.delete(f"/v1/items/{victim}")
                except httpx.TransportError:
                    acked_add.pop(victim)  # in flight at the kill: it may or may not have happened
                    return
                if r.status_code == 200:
                    acked_del.add(victim)
                    acked_add.pop(victim)


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["HNSW16"])  # tombstones + snapshots; Flat shares the code path
def test_acknowledged_writes_survive_kill_9(tiny_bundle, tmp_path, factory):
    index = tmp_path / "index"
    vectors = {f"{p}{c}": unit(3000, 32, seed=10 * c + k) for c in range(3) for k, p in enumerate("abc")}
    acked_add: dict[str, int] = {}
    acked_del: set[str] = set()
    # checkpoint often, so kills land before, during and after snapshots
    extra = ["--config", factory, "--checkpoint-every", "40"]
    for cycle in range(3):
        with server_process(tiny_bundle, index, extra) as (url, proc):
            # everything acknowledged in earlier lives is here
            check(url, vectors, acked_add, acked_del)
            stop = threading.Event()
            threads = [threading.Thread(target=writer, args=(url, f"{p}{cycle}", vectors[f"{p}{cycle}"], acked_add, acked_del,
                                                             stop, cycle * 10 + k))
                       for k, p in enumerate("abc")]
            for t in threads:
                t.start()
            time.sleep(1.0 + random.Random(cycle).random() * 1.5)
            os.kill(proc.pid, signal.SIGKILL)  # kill -9 while the writers are busy
            proc.wait()
            stop.set()
            for t in threads:
                t.join()
        assert len(acked_add) > 10 * (cycle + 1), "the writers got too few acknowledgements to mean anything"
    with server_process(tiny_bundle, index, extra) as (url, _):
        check(url, vectors, acked_add, acked_del)


def check(url: str, vectors: dict, acked_add: dict, acked_del: set) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        for item, row in acked_add.items():
            assert http.get(f"/v1/items/{item}").status_code == 200, f"acknowledged add {item} lost"
        for item in acked_del:
            assert http.get(f"/v1/items/{item}").status_code == 404, f"acknowledged delete {item} lost"
        # and the vectors are the ones that were sent (spot check by exact search)
        for item in list(acked_add)[:: max(1, len(acked_add) // 15)]:
            v = vectors[item.split("-")[0]][acked_add[item]]
            r = http.post("/v1/search", json={"space": SPACE, "k": 1, "embedding_b64": base64.b64encode(v.tobytes()).decode()})
            assert r.json()["results"][0]["id"] == item


def test_corrupt_index_gives_one_line_error(tiny_bundle, tmp_path):
    index = tmp_path / "index"
    with server_process(tiny_bundle, index) as (url, _):
        httpx.post(url + "/v1/items", json={"space": SPACE, "items": [{"id": "a", "embedding": unit(1, 32)[0].tolist()}]})
    snap = next(index.glob("index-*.faiss"))  # written on graceful shutdown
    snap.write_bytes(snap.read_bytes()[:-7] + b"garbage")
    proc = subprocess.run([*CLI, "serve", "--bundle", str(tiny_bundle), "--index", str(index), "--port", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: index snapshot") and "checksum" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
