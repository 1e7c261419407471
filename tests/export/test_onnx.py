"""ONNX export: the bundle contract (opset >= 17, `image` NCHW float32 with dynamic batch/H/W -> `embedding`),
parity with torch at several sizes and batch sizes, fp16 conversion and calibrated int8 QDQ quantization."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.errors import ExportError
from export.onnx import OPSET, check_onnx, export_onnx, head_nodes, quantize_int8, read_metadata
from sdk.backends import onnx_session as session

from .conftest import DIM, SPACE, load, make_checkpoint, min_cosine, torch_embed


def test_contract_names_opset_and_dynamic_axes(bundle):
    for name in ("query.onnx", "query.fp16.onnx", "query.int8.onnx", "gallery.onnx"):
        facts = check_onnx(bundle / name, embedding_dim=DIM)
        assert facts["opset"] >= 17 and OPSET >= 17
        assert facts["input_dtype"] == facts["output_dtype"] == "FLOAT"
        batch, channels, h, w = facts["input_shape"]
        assert channels == 3 and all(isinstance(d, str) for d in (batch, h, w)), facts
        assert facts["output_shape"][1] == DIM and isinstance(facts["output_shape"][0], str)
        sess = session(bundle / name)
        assert [i.name for i in sess.get_inputs()] == ["image"]
        assert [o.name for o in sess.get_outputs()] == ["embedding"]


def test_head_nodes_are_found_by_their_torch_module(bundle):
    """The exporter's per-node module paths find GeM's and the L2 norm's ops (kept float in fp16/int8)."""
    graph = onnx.load(str(bundle / "query.onnx")).graph
    ops = {n.op_type for n in graph.node if n.name in set(head_nodes(graph))}
    assert {"Pow", "ReduceMean", "Div"} <= ops and not ops & {"Conv", "Gemm", "MatMul"}, ops


def test_metadata_travels_with_every_file(bundle):
    for name, prec in (("query.onnx", "fp32"), ("query.fp16.onnx", "fp16"), ("query.int8.onnx", "int8")):
        meta = read_metadata(bundle / name)
        assert meta["embedding_space"] == SPACE and meta["precision"] == prec and meta["role"] == "query"
        assert int(meta["embedding_dim"]) == DIM and '"mean"' in meta["preprocess"]


@pytest.mark.parametrize("batch,hw", [(1, (64, 64)), (3, (64, 64)), (2, (48, 80)), (1, (96, 72)), (4, (33, 47))])
def test_fp32_parity_at_any_size_and_batch(bundle, ckpts, batch, hw):
    """GeM reduces over whatever spatial size arrives: no kernel size is baked in at the trace size."""
    model = load(ckpts["query"])
    x = np.random.default_rng(batch).standard_normal((batch, 3, *hw)).astype(np.float32)
    got = session(bundle / "query.onnx").run(None, {"image": x})[0]
    ref = torch_embed(model, x)
    assert got.shape == (batch, DIM) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_fp32_parity_on_real_photos(bundle, query_model, photos_nchw):
    got = session(bundle / "query.onnx").run(None, {"image": photos_nchw})[0]
    assert np.abs(got - torch_embed(query_model, photos_nchw)).max() <= 1e-4


def test_gallery_model_cgd_head_parity(bundle, ckpts, photos):
    model = load(ckpts["gallery"])
    x = photos.batch(model.spec)[:16]
    got = session(bundle / "gallery.onnx").run(None, {"image": x})[0]
    assert np.abs(got - torch_embed(model, x)).max() <= 1e-4


def _initializer_dtypes(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        if t.dims and np.prod(t.dims) >= 64:
            name = onnx.TensorProto.DataType.Name(t.data_type)
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_fp16_file_has_half_weights_float_io_and_close_embeddings(bundle, photos_nchw):
    dtypes = _initializer_dtypes(bundle / "query.fp16.onnx")
    assert dtypes.get("FLOAT16", 0) > dtypes.get("FLOAT", 0), dtypes
    fp32 = session(bundle / "query.onnx").run(None, {"image": photos_nchw})[0]
    half = session(bundle / "query.fp16.onnx").run(None, {"image": photos_nchw})[0]
    assert half.dtype == np.float32
    assert min_cosine(half, fp32) >= 0.999
    sizes = [(bundle / n).stat().st_size for n in ("query.fp16.onnx", "query.onnx")]
    assert sizes[0] <= 0.6 * sizes[1]


def test_int8_is_static_qdq_with_int8_weights(bundle):
    model = onnx.load(str(bundle / "query.int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    init = {t.name: t for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init
                 and init[n.input[0]].data_type == onnx.TensorProto.INT8 and len(init[n.input[0]].dims) == 4]
    assert weight_dq, "conv weights are not stored as int8"
    # per-channel: one scale per output channel
    assert any(numpy_helper.to_array(init[n.input[1]]).size > 1 for n in weight_dq)
    # activations are quantized with a calibrated (static) scale: QuantizeLinear on non-initializer inputs
    act_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in init]
    assert len(act_q) >= 5


def test_int8_close_to_fp32_on_real_photos_and_calibration_recorded(bundle, photos_nchw):
    from sdk.bundle import read_manifest

    fp32 = session(bundle / "query.onnx").run(None, {"image": photos_nchw})[0]
    q = session(bundle / "query.int8.onnx").run(None, {"image": photos_nchw})[0]
    assert min_cosine(q, fp32) >= 0.99
    record = read_manifest(bundle).extra["export"]
    assert record["calibration"]["images"] == len(photos_nchw) == 69
    assert record["calibration"]["activation_ranges"].startswith("per tensor: 5% percentile")
    search = record["checks"]["query.int8.onnx"]["int8"]
    assert search["calibration_min_cosine"] >= 0.99 and search["float_leading_convs"] in (0, 2, 4, 6, 8)


def test_int8_float_convs_keeps_leading_convs_float(tmp_path, bundle, photos_nchw):
    quantize_int8(bundle / "query.onnx", tmp_path / "q2.onnx", photos_nchw[:16], float_convs=2)
    graph = onnx.load(str(tmp_path / "q2.onnx")).graph
    init = {t.name for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    producers = {o: n for n in graph.node for o in n.output}
    quantized_weight = [c.input[1] not in init and producers[c.input[1]].op_type == "DequantizeLinear"
                        for c in convs]
    assert quantized_weight[:2] == [False, False] and all(quantized_weight[2:])


def _identity_conv(path):
    """image (N,3,H,W) -> 1x1 Conv with identity weights -> Relu -> embedding: the output is relu(input)."""
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["conv"], name="conv"),
         helper.make_node("Relu", ["conv"], ["embedding"], name="relu")],
        "identity", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3, "h", "w"])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return path


def test_int8_ranges_from_every_image_not_one_outlier_or_the_last_batch(tmp_path):
    # 40 images whose values span [-(1+i/100), 2+i/100] and one unusual image spanning [-50, 80]; with
    # onnxruntime's own MinMax the outlier sets the range, and with CalibMaxIntermediateOutputs only the
    # last partial batch would count (onnxruntime 1.32 drops full buffers uncomputed)
    from export.onnx import per_image_ranges

    images = np.stack([np.linspace(-(1 + i / 100), 2 + i / 100, 48, dtype=np.float32).reshape(3, 4, 4)
                       for i in range(40)] + [np.linspace(-50, 80, 48, dtype=np.float32).reshape(3, 4, 4)])
    model = _identity_conv(tmp_path / "identity.onnx")
    lo, hi = per_image_ranges(model, images, tmp_path / "augmented.onnx")["image"]
    assert -1.40 < lo < -1.30 and 2.30 < hi < 2.40  # 5th / 95th percentile of the per-image ranges
    quantize_int8(model, tmp_path / "q.onnx", images, batch_size=8)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image")
    assert float(init[q.input[1]]) == pytest.approx((hi - lo) / 255, rel=1e-3)  # uint8 scale of that range
    out = session(tmp_path / "q.onnx").run(None, {"image": images[:40]})[0]
    assert np.abs(out - np.maximum(images[:40], 0)).max() < 0.02  # typical images keep 8-bit precision


def test_int8_needs_a_calibration_batch(tmp_path, bundle):
    with pytest.raises(ExportError, match="non-empty"):
        quantize_int8(bundle / "query.onnx", tmp_path / "q.onnx", np.zeros((0, 3, 64, 64), np.float32))


def test_export_refuses_old_opset(tmp_path):
    model = load(make_checkpoint(tmp_path / "m.pt"))
    with pytest.raises(ExportError, match="opset >= 17"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)


def test_check_onnx_rejects_wrong_names(tmp_path):
    import torch

    class Plain(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    torch.onnx.export(Plain(), (torch.zeros(1, 3, 8, 8),), str(tmp_path / "p.onnx"), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False)
    with pytest.raises(ExportError, match="expected \\['image'\\]"):
        check_onnx(tmp_path / "p.onnx")
