"""TFLite export (litert-torch, no TensorFlow) run with ai-edge-litert: NHWC batch-1 `image` -> `embedding`,
fp32 parity with torch, fp16 weights and calibrated int8 (ai-edge-quantizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.errors import ExportError
from export.tflite import _keep_each_image, check_tflite, leading_conv_scopes, robust_ranges
from sdk.backends import open_runner
from sdk.bundle import ModelFile

from .conftest import DIM, min_cosine, torch_embed


def _embed(path, nchw: np.ndarray) -> np.ndarray:
    return open_runner(path, ModelFile(path.name, "tflite", layout="NHWC", batch="1")).embed_nchw(nchw)


@pytest.mark.parametrize("name", ["query.tflite", "query.fp16.tflite", "query.int8.tflite"])
def test_signature_is_nhwc_batch1_float32(bundle, name):
    facts = check_tflite(bundle / name, DIM, (64, 64))
    assert facts["input_shape"] == [1, 64, 64, 3] and facts["output_shape"] == [1, DIM]
    assert facts["input_dtype"] == facts["output_dtype"] == "float32"
    assert facts["signatures"]["serving_default"] == {"inputs": ["image"], "outputs": ["embedding"]}


def test_fp32_parity_with_torch_on_real_photos(bundle, query_model, photos_nchw):
    got = _embed(bundle / "query.tflite", photos_nchw)
    assert got.shape == (len(photos_nchw), DIM)
    assert np.abs(got - torch_embed(query_model, photos_nchw)).max() <= 1e-4


def test_fp16_weights_halve_the_file_and_stay_close(bundle, photos_nchw):
    fp32 = _embed(bundle / "query.tflite", photos_nchw)
    half = _embed(bundle / "query.fp16.tflite", photos_nchw)
    assert min_cosine(half, fp32) >= 0.999
    assert (bundle / "query.fp16.tflite").stat().st_size <= 0.6 * (bundle / "query.tflite").stat().st_size


def test_int8_is_quantized_and_close_to_fp32(bundle, photos_nchw):
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(bundle / "query.int8.tflite"))
    types = {t.type for t in model.subgraphs[0].tensors}
    assert 9 in types  # TensorType.INT8: weights and activations
    fp32 = _embed(bundle / "query.tflite", photos_nchw)
    q = _embed(bundle / "query.int8.tflite", photos_nchw)
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-4)  # the L2 head stays float
    assert min_cosine(q, fp32) >= 0.99


def test_quantized_files_keep_signature_names_but_drop_debug_names(bundle):
    from ai_edge_litert.tools import flatbuffer_utils

    for name, long_names in (("query.tflite", True), ("query.int8.tflite", False)):
        sg = flatbuffer_utils.read_model(str(bundle / name)).subgraphs[0]
        longest = max(len(t.name) for t in sg.tensors)
        assert (longest > 100) == long_names
        assert check_tflite(bundle / name)  # signature still resolves image -> embedding


def test_leading_conv_scopes_select_the_first_convs(bundle):
    import re

    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as u

    scopes = leading_conv_scopes(bundle / "query.tflite", 2)
    assert len(scopes) == 2
    model = u.read_model(str(bundle / "query.tflite"))
    sg = model.subgraphs[0]
    matched = [i for i, op in enumerate(sg.operators) if any(re.search(s, u.get_op_scope(op, sg.tensors))
                                                                for s in scopes)]
    codes = [model.operatorCodes[sg.operators[i].opcodeIndex].builtinCode for i in matched]
    assert len(matched) == 2 and set(codes) <= {3, 4}  # CONV_2D / DEPTHWISE_CONV_2D


def test_int8_needs_nhwc_calibration(tmp_path, bundle):
    from export.tflite import quantize_int8

    with pytest.raises(ExportError, match="non-empty \\(N,H,W,3\\)"):
        quantize_int8(bundle / "query.tflite", tmp_path / "q.tflite", np.zeros((4, 3, 64, 64), np.float32))


def test_activation_ranges_are_not_set_by_one_outlier_image():
    # the Calibrator stores the first image's QSV as is, then calls the update for each further image
    per_image = [{"min": np.array([-1.0 - i / 100]), "max": np.array([2.0 + i / 100])} for i in range(39)]
    per_image.append({"min": np.array([-50.0]), "max": np.array([80.0])})  # one unusual photo
    qsv = per_image[0]
    for new in per_image[1:]:
        qsv = _keep_each_image(qsv, new)
    assert qsv["min"][0] == -50.0 and qsv["max"][0] == 80.0 and len(qsv["maxs"]) == 40
    ranges = robust_ranges({"t": qsv, "input": {"min": np.array([0.5]), "max": np.array([1.0])}})
    lo, hi = float(ranges["t"]["min"][0]), float(ranges["t"]["max"][0])
    assert -1.40 < lo < -1.30 and 2.30 < hi < 2.40  # the 5th / 95th percentile of the per-image ranges
    assert set(ranges["t"]) == {"min", "max"}  # per-image lists are not passed on to the quantizer
    assert float(ranges["input"]["min"][0]) == 0.5  # a tensor seen once keeps its min/max


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_int8_search_shows_one_counting_bar_per_candidate(tmp_path, ckpts, real_photos, capfd, fmt):
    """Each candidate of the accuracy-aware search gets its own bar, labelled with what it calibrates,
    that counts the calibration images to the end (the TFLite one used to print an empty 0/N bar)."""
    import re

    from export.bundle import export_bundle

    export_bundle(ckpts["query"], tmp_path / "b", formats=fmt, precisions=("fp32", "int8"),
                  calibration=real_photos, max_calibration_images=8, tflite_metadata=False, progress=True)
    err = capfd.readouterr().err
    record = json.loads((tmp_path / "b" / "manifest.json").read_text())
    checks = record["extra"]["export"]["checks"]
    tried = next(facts["int8"]["tried"] for name, facts in checks.items() if "int8" in facts)
    for k in tried:
        label = f"int8 {fmt} search, {k} float convs"
        assert re.search(re.escape(label) + r":\s+100%.*\b8/8\b", err), f"no finished bar for {label!r}:\n{err[-2000:]}"
    assert "calibrating int8" not in err
