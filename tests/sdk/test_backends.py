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


def test_int8_sums_past_int16_are_exact_on_every_x86(tmp_path):
    """uint8 255 x int8 127 products, 64 of them: on x86 CPUs without VNNI (AVX2, e.g. AMD Zen 2/3) onnxruntime's
    fast u8 x s8 kernel adds pairs in int16 and saturates (a plain session returns 32 there, not 64). The one
    runtime layer's session asks for the exact kernels on those CPUs; on VNNI and ARM both are exact."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdk.backends import onnx_session

    k = 64
    consts = {"xs": np.float32(1 / 255), "xz": np.uint8(0), "wq": np.full((k, 4), 127, np.int8),
              "ws": np.float32(1 / 127), "wz": np.int8(0), "ys": np.float32(1), "yz": np.uint8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "ys", "yz"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "int8_sums", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "sums.onnx")
    out = onnx_session(tmp_path / "sums.onnx", threads=1).run(None, {"x": np.ones((1, k), np.float32)})[0]
    np.testing.assert_array_equal(out, np.full((1, 4), 64.0, np.float32))
