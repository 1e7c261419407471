"""A running server as rank distillation's black-box teacher: POST /v1/embed (write scope) returns the
bundle's gallery embeddings, the same as the bundle embeds locally; a read key or a dead server is a
one-line TeacherError, and nothing is cached from a failed call."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdk.server import ServerConfig

from .conftest import server_in_thread

READ, WRITE = "read-key-0001", "write-key-0002"
KEYS = {READ: frozenset({"read"}), WRITE: frozenset({"read", "write"})}


@pytest.fixture()
def photos(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_server_teacher_matches_the_bundle_and_needs_a_write_key(tiny_bundle, tmp_path, photos):
    from training.teacher import TeacherError, bundle_teacher, resolve_teacher, teacher_embeddings

    cfg = ServerConfig(bundle=tiny_bundle, index=tmp_path / "index", api_keys=KEYS)
    with server_in_thread(cfg) as (url, app):
        teacher = resolve_teacher(url, api_key=WRITE)
        assert teacher.dim == 32 and teacher.space == bundle_teacher(tiny_bundle).space == "test-space"
        run = teacher_embeddings(teacher, photos, cache=tmp_path / "cache", batch_size=2, progress=False)
        local = bundle_teacher(tiny_bundle).embed(photos)
        np.testing.assert_allclose(run.embeddings, local, atol=1e-5)
        assert run.teacher_calls == 5 and len(app.state.retrieval.index) == 0  # embedded, nothing stored
        reader = resolve_teacher(url, api_key=READ)
        with pytest.raises(TeacherError, match="403"):
            teacher_embeddings(reader, photos, cache=tmp_path / "cache2", progress=False)
        assert not list((tmp_path / "cache2").rglob("*.npy"))
        import httpx

        bad = httpx.post(url + "/v1/embed", headers={"X-API-Key": WRITE}, data={"role": "sideways"},
                         files=[("images", ("a.png", photos[0].read_bytes(), "image/png"))])
        assert bad.status_code == 400 and "role must be one of" in bad.json()["detail"]
    with pytest.raises(TeacherError, match="unreachable"):
        resolve_teacher(url, api_key=WRITE)
