"""One runtime layer: the embedder, the server and export's verify all run bundle files through
sdk.backends.Runner, so what `verify` measures is what the phone and the server run."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.backends import BackendError, Runner, open_runner
from sdk.bundle import ModelFile, read_manifest


@pytest.fixture()
def runs(monkeypatch) -> list[str]:
    """Every Runner.embed call, as the path of the file it ran."""
    seen: list[str] = []
    original = Runner.embed

    def spy(self, x):
        seen.append(self.file.path)
        return original(self, x)

    monkeypatch.setattr(Runner, "embed", spy)
    return seen


def test_embedder_runs_through_the_runner(tiny_bundle, ukbench_dir, runs):
    from sdk import Embedder

    photos = sorted(ukbench_dir.glob("*.jpg"))[:3]
    v = Embedder.from_bundle(tiny_bundle).embed(photos)
    assert v.shape == (3, 32) and runs == ["query.onnx"]


def test_server_runs_through_the_runner(tiny_bundle, ukbench_dir, tmp_path, runs):
    from fastapi.testclient import TestClient

    from sdk.server import ServerConfig, create_app

    photo = sorted(ukbench_dir.glob("*.jpg"))[0]
    with TestClient(create_app(ServerConfig(bundle=tiny_bundle, index=tmp_path / "index"))) as http:
        r = http.post("/v1/items", files=[("images", ("a.jpg", photo.read_bytes(), "image/jpeg"))])
        assert r.status_code == 200, r.text
        r = http.post("/v1/search/image", files={"image": ("q.jpg", photo.read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == "a.jpg", r.text
    assert runs == ["gallery.onnx", "query.onnx"]


def test_verify_runs_through_the_runner(tiny_bundle, ukbench_dir, runs):
    from export.verify import verify_bundle

    report = verify_bundle(tiny_bundle, [ukbench_dir], runs=1, tflite_support=False, max_images=8, progress=False)
    assert {"gallery.onnx", "query.onnx"} <= set(runs)
    assert all(r.max_abs_diff <= 1e-4 for r in report.files if r.format == "onnx")


def test_runner_gives_the_embedders_numbers(tiny_bundle, ukbench_dir):
    from sdk import Embedder
    from sdk.preprocess import preprocess_batch

    entry = read_manifest(tiny_bundle).model("query")
    photos = sorted(ukbench_dir.glob("*.jpg"))[:20]  # more than one MAX_BATCH chunk
    runner = open_runner(tiny_bundle / "query.onnx", entry.file("onnx"), threads=1)
    assert runner.layout == "NCHW" and runner.dynamic_hw
    direct = runner.embed_nchw(preprocess_batch(photos, entry.preprocess))
    np.testing.assert_allclose(direct, Embedder.from_bundle(tiny_bundle, threads=1).embed(photos), atol=1e-6)


def test_a_file_the_runtime_cannot_load_is_one_line(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(BackendError, match="onnxruntime cannot load .*re-export the bundle"):
        open_runner(tmp_path / "bad.onnx", ModelFile("bad.onnx", "onnx"))
