"""Standard TFLite metadata and tflite-support's ImageEmbedder, through the isolated environment that the
export step creates (tflite-support needs protobuf<4; this venv's onnx needs protobuf>=4). Slow on first
use: the environment is pip-installed from PyPI (~20 s) into ~/.cache/retrieval-sdk (or
$RETRIEVAL_SDK_TFLITE_SUPPORT_ENV)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from export import tflite_support_env as tfs
from sdk.backends import open_runner
from sdk.bundle import ModelFile
from sdk.preprocess import normalize

from .conftest import DIM, SPACE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tflite_bundle(tmp_path_factory, ckpts, real_photos):
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("tfs") / "b"
    export_bundle(ckpts["query"], out, formats="tflite", precisions=("fp32", "int8"),
                  calibration=real_photos / "ukbench-56", tflite_metadata=True)
    return out


def test_environment_is_isolated_from_this_one():
    python = tfs.ensure_env()
    code = "import google.protobuf as p, tflite_support; print(p.__version__)"
    theirs = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert int(theirs.split(".")[0]) < 4
    import google.protobuf

    assert int(google.protobuf.__version__.split(".")[0]) >= 4  # ours (onnx needs it): two environments


def test_metadata_describes_normalisation_and_output(tflite_bundle, query_model):
    from sdk.bundle import read_manifest

    record = read_manifest(tflite_bundle).extra["export"]
    assert record["tflite_metadata"] == {"query.tflite": "written (tflite-support)",
                                         "query.int8.tflite": "written (tflite-support)"}
    meta = tfs.read_metadata(tflite_bundle / "query.tflite")
    assert meta is not None and SPACE in meta["description"]
    graph = meta["subgraph_metadata"][0]
    image = graph["input_tensor_metadata"][0]
    assert image["name"] == "image" and image["content"]["content_properties"]["color_space"] == "RGB"
    norm = next(p for p in image["process_units"] if p["options_type"] == "NormalizationOptions")["options"]
    spec = query_model.spec
    np.testing.assert_allclose(norm["mean"], np.asarray(spec.mean) * spec.value_range, rtol=1e-6)
    np.testing.assert_allclose(norm["std"], np.asarray(spec.std) * spec.value_range, rtol=1e-6)
    assert graph["output_tensor_metadata"][0]["name"] == "embedding"


def _ours(path, pixels, spec) -> np.ndarray:
    """Our embedder's path: sdk normalisation, then the file through sdk.backends (one image per call)."""
    runner = open_runner(path, ModelFile(path.name, "tflite", layout="NHWC", batch="1"))
    return np.concatenate([runner.embed_nchw(normalize(p, spec)[None]) for p in pixels])


def test_image_embedder_gives_our_embedding(tflite_bundle, photos, query_model):
    spec = query_model.spec
    pixels = photos.pixels[:12]
    theirs, ms = tfs.image_embedder(tflite_bundle / "query.tflite", pixels, repeats=3)
    ours = _ours(tflite_bundle / "query.tflite", pixels, spec)
    assert theirs.shape == (12, DIM) and ms > 0
    assert np.abs(theirs - ours).max() <= 1e-4
    q_theirs, _ = tfs.image_embedder(tflite_bundle / "query.int8.tflite", pixels)
    q_ours = _ours(tflite_bundle / "query.int8.tflite", pixels, spec)
    cos = (q_theirs / np.linalg.norm(q_theirs, axis=1, keepdims=True) * q_ours).sum(1)
    assert cos.min() >= 0.999  # int8 kernels of two runtime generations: close, not bit-identical
