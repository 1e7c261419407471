"""`index build --runner ray`: a local Ray (2 CPUs, no dashboard, node on 127.0.0.1, checked to listen on
loopback only) embeds real Fashion-MNIST images in an actor pool into a pgvector collection, giving the
single-process run's ids and embeddings; a re-run resumes (skips what is stored); the API shim picks one
of Ray's two actor-pool spellings."""

from __future__ import annotations

import gzip

import numpy as np
import psutil
import pytest
from PIL import Image

from sdk.index_url import open_index
from sdk.ingest import ingest
from sdk.ingest_ray import ingest_ray
from sdk.ray_compat import actor_pool, init_local_ray

from ..backends import pg_url, postgres_uri  # noqa: F401 (fixture)

N_IMAGES = 96


def fashion_images(folder, n: int, fashion_mnist_dir) -> None:
    """n real 28x28 Fashion-MNIST test images as PNG files in class subfolders."""
    with gzip.open(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for j in range(n):
        (folder / f"c{labels[j]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[j]).convert("RGB").save(folder / f"c{labels[j]}" / f"{j:05d}.png")


def ray_listeners() -> list[tuple[str, int]]:
    """(address, port) of every TCP socket listening in this process and the Ray processes it started."""
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    out = []
    for proc in procs:
        try:
            out += [c.laddr[:2] for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_ray_ingest_matches_single_process_and_resumes(tiny_bundle, tmp_path, postgres_uri, fashion_mnist_dir):  # noqa: F811
    import ray

    images = tmp_path / "images"
    fashion_images(images, N_IMAGES, fashion_mnist_dir)
    (images / "broken.jpg").write_bytes(b"not an image")
    local = ingest(tiny_bundle, images, tmp_path / "local", progress=False, log=lambda m: None)
    url = pg_url(postgres_uri)
    assert init_local_ray(2)  # started here, so the test can look at its sockets before the run ends
    try:
        listening = ray_listeners()
        assert listening and all(addr in ("127.0.0.1", "::1") for addr, _ in listening), listening
        assert ray.cluster_resources()["CPU"] == 2
        logs: list[str] = []
        report = ingest_ray(tiny_bundle, images, url, batch_size=16, workers=2, log=logs.append)
        assert (report.added, report.skipped, [i for i, _ in report.failed]) == (N_IMAGES, 0, ["broken.jpg"])
        again = ingest_ray(tiny_bundle, images, url, batch_size=16, workers=2, log=logs.append)
        assert (again.added, again.skipped) == (0, N_IMAGES) and any("already indexed" in m for m in logs)
    finally:
        ray.shutdown()
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
