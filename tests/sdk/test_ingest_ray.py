"""`index build --runner ray`: a local Ray (2 CPUs, no dashboard, in a network namespace holding only the
loopback interface) embeds real Fashion-MNIST images in an actor pool into a pgvector collection, giving the
single-process run's ids and embeddings; a re-run resumes (skips what is stored); the API shim picks one
of Ray's two actor-pool spellings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdk.index_url import open_index
from sdk.ingest import ingest
from sdk.ray_compat import actor_pool

from ..backends import pg_url
from ..servers import CLI, ROOT

N_IMAGES = 96


def fashion_images(folder, n: int, fashion_mnist_dir) -> None:
    """n real 28x28 Fashion-MNIST test images as PNG files in class subfolders."""
    from training.data import fashion_mnist_arrays

    data = fashion_mnist_arrays(fashion_mnist_dir, split="test", limit=n)
    for j, (pixels, label) in enumerate(zip(data.images, data.labels)):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).convert("RGB").save(folder / f"c{label}" / f"{j:05d}.png")


# Runs inside a new network namespace holding only the loopback interface, so every port Ray opens (it
# binds some on all interfaces whatever its node IP) is reachable from this machine only.
DRIVER = """
import json, sys
import psutil, ray
from sdk.ingest_ray import ingest_ray
from sdk.ray_compat import init_local_ray
bundle, images, url = sys.argv[1:4]
init_local_ray(2)
procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
listening = sorted({c.laddr[0] for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN})
report = ingest_ray(bundle, images, url, batch_size=16, workers=2, log=lambda m: None)
print(json.dumps({"interfaces": sorted(psutil.net_if_addrs()), "listening": listening,
                  "cpus": ray.cluster_resources()["CPU"], "added": report.added, "skipped": report.skipped,
                  "failed": [i for i, _ in report.failed]}))
ray.shutdown()
"""


def in_loopback_namespace(*cmd: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """Run cmd in a new network namespace with only `lo` up (unshare -n, as root)."""
    script = 'ip link set lo up && exec "$@"'
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script, "sh", *cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_ray_ingest_matches_single_process_and_resumes(tiny_bundle, tmp_path, postgres_uri, fashion_mnist_dir):
    images = tmp_path / "images"
    fashion_images(images, N_IMAGES, fashion_mnist_dir)
    (images / "broken.jpg").write_bytes(b"not an image")
    local = ingest(tiny_bundle, images, tmp_path / "local", progress=False, log=lambda m: None)
    url = pg_url(postgres_uri)
    run = json.loads(in_loopback_namespace(sys.executable, "-c", DRIVER, str(tiny_bundle), str(images), url)
                     .stdout.strip().splitlines()[-1])
    assert run["interfaces"] == ["lo"] and run["listening"] and run["cpus"] == 2, run
    assert set(run["listening"]) <= {"0.0.0.0", "::", "127.0.0.1", "::1", "::ffff:127.0.0.1"}, run  # all: loopback here
    assert (run["added"], run["skipped"], run["failed"]) == (N_IMAGES, 0, ["broken.jpg"])
    # the CLI, resumed: everything is stored, nothing is embedded again
    again = in_loopback_namespace(*CLI, "index", "build", str(tiny_bundle), str(images), "--index", url,
                                  "--runner", "ray", "--workers", "2", "--batch-size", "16")
    assert f"{N_IMAGES} already indexed" in again.stdout and "0 added" in again.stdout, again.stdout
    with open_index(tmp_path / "local") as a, open_index(url) as b:
        assert local.added == N_IMAGES and sorted(a.ids()) == sorted(b.ids())
        ids = sorted(a.ids())
        diff = np.abs(a.get_vectors(ids) - b.get_vectors(ids)).max()
        assert diff < 1e-6, diff
        assert b.get(ids[0])["metadata"] == a.get(ids[0])["metadata"]
        assert b.thumbnail(ids[0])[1] == "image/jpeg"


def test_actor_pool_shim_uses_one_spelling():
    kwargs = actor_pool(3)
    assert len(kwargs) == 1
    if "compute" in kwargs:
        assert kwargs["compute"].min_size == kwargs["compute"].max_size == 3
    else:
        assert kwargs == {"concurrency": 3}
