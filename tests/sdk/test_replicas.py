"""Stateless replicas: two `retrieval-sdk serve` processes on one PostgreSQL collection. An add through one
is visible to a search through the other at once, and a kill -9 of either, while writers are busy on
both, loses no acknowledged add or delete."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import ExitStack

import pytest

from sdk.client import Client

from ..backends import pg_url
from .conftest import server_process, unit
from .test_crash import check, writer


@pytest.mark.slow
def test_two_replicas_share_writes_and_survive_kill_9(tiny_bundle, postgres_uri):
    url = pg_url(postgres_uri)
    vectors = {f"{p}{c}": unit(2000, 32, seed=10 * c + k) for c in range(2) for k, p in enumerate("ab")}
    acked_add: dict[str, int] = {}
    acked_del: set[str] = set()
    with ExitStack() as stack:
        def replica():
            return stack.enter_context(server_process(tiny_bundle, url))

        replicas = [replica(), replica()]
        (url_a, _), (url_b, _) = replicas
        # read-your-writes across replicas: add through A, find it through B (and the other way round)
        with Client(url_a) as a, Client(url_b) as b:
            x = unit(2, 32, seed=99)
            assert a.add(["via-a"], x[:1], metadata=[{"shop": 1}]).added == 1
            assert b.search_vector(x[0], k=1)[0].id == "via-a"
            assert b.search_vector(x[0], k=1, filter={"shop": 2}).ids == []
            b.add(["via-b"], x[1:])
            assert a.search_vector(x[1], k=1)[0].id == "via-b"
            b.delete("via-a")
            assert "via-a" not in a.search_vector(x[0], k=5).ids
            assert a.health()["items"] == b.health()["items"] == 1
        for cycle in range(2):  # kill -9 A, then B, each while both replicas take writes
            stop = threading.Event()
            threads = [threading.Thread(target=writer, args=(served, f"{p}{cycle}", vectors[f"{p}{cycle}"], acked_add,
                                                             acked_del, stop, 10 * cycle + k))
                       for k, (p, (served, _)) in enumerate(zip("ab", replicas))]
            for t in threads:
                t.start()
            time.sleep(1.5)
            victim = replicas[cycle][1]
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join()
            assert len(acked_add) > 10 * (cycle + 1), "too few acknowledged writes to mean anything"
            check(replicas[1 - cycle][0], vectors, acked_add, acked_del)  # all of them, seen by the other replica
            replicas[cycle] = replica()  # a fresh replica in its place sees them too
            check(replicas[cycle][0], vectors, acked_add, acked_del)
