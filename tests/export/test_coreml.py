"""CoreML (.mlpackage, ML program, iOS 16+): structural validation on every OS; prediction parity on macOS."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from export.coreml import check_coreml, export_coreml, proxy_model
from export.errors import ExportError
from sdk.preprocess import PreprocessSpec

from .conftest import DIM, SPACE, load, min_cosine, torch_embed


@pytest.mark.parametrize("name,precision,weights", [("query.mlpackage", "fp32", "float32"),
                                                    ("query.fp16.mlpackage", "fp16", "float16"),
                                                    ("query.int8.mlpackage", "int8", "int8")])
def test_structure_io_dtypes_and_metadata(bundle, ckpts, name, precision, weights):
    spec = load(ckpts["query"]).spec
    facts = check_coreml(bundle / name, DIM, spec, precision, SPACE)
    assert facts["type"] == "mlProgram" and facts["specification_version"] >= 7  # iOS 16
    assert facts["input_type"] == "tensor" and facts["input_shape"] == [1, 3, 64, 64]
    # fp16 compute must not make the I/O fp16: both pinned to float32
    assert facts["input_dtype"] == "FLOAT32" and facts["output_dtype"] == "FLOAT32"
    assert max(facts["weight_dtypes"], key=facts["weight_dtypes"].get) == weights
    meta = facts["metadata"]
    assert meta["embedding_space"] == SPACE and meta["embedding_dim"] == str(DIM) and meta["precision"] == precision
    assert PreprocessSpec.from_dict(json.loads(meta["preprocess"])) == spec


def test_image_input_variant(tmp_path, ckpts):
    model = load(ckpts["query"])
    path = export_coreml(model, tmp_path / "img.mlpackage", model.spec, "fp16", image_input=True,
                         metadata={"embedding_dim": DIM, "embedding_space": SPACE, "preprocess": model.spec.to_dict()})
    facts = check_coreml(path, DIM, model.spec, "fp16", SPACE)
    assert facts["input_type"] == "image" and facts["input_color"] == "RGB" and facts["output_dtype"] == "FLOAT32"


def test_structural_check_catches_a_wrong_space(bundle, ckpts):
    with pytest.raises(ExportError, match="embedding_space"):
        check_coreml(bundle / "query.mlpackage", DIM, load(ckpts["query"]).spec, "fp32", "another-space")


def test_fp16_and_int8_torch_proxies_stay_close(ckpts, photos_nchw):
    """Linux stand-in for the numerical effect of the CoreML precisions (prediction needs macOS)."""
    import torch

    model = load(ckpts["query"])
    ref = torch_embed(model, photos_nchw)
    with torch.no_grad():
        half = proxy_model(model, "fp16")(torch.from_numpy(photos_nchw)).float().numpy()
        q = proxy_model(model, "int8")(torch.from_numpy(photos_nchw)).float().numpy()
    assert min_cosine(half, ref) >= 0.999 and min_cosine(q, ref) >= 0.98
    assert not np.allclose(half, ref, atol=1e-7)  # the proxy really runs in reduced precision


@pytest.mark.skipif(sys.platform != "darwin", reason="CoreML prediction needs macOS (the Core ML framework); "
                                                      "on Linux the package is validated structurally above")
def test_prediction_parity_on_macos(bundle, ckpts, photos_nchw):
    from sdk.backends import open_runner
    from sdk.bundle import ModelFile

    def predict(path, x, spec):
        return open_runner(path, ModelFile(path.name, "coreml", batch="1"), spec=spec).embed_nchw(x)

    model = load(ckpts["query"])
    ref = torch_embed(model, photos_nchw[:8])
    got = predict(bundle / "query.mlpackage", photos_nchw[:8], model.spec)
    assert np.abs(got - ref).max() <= 1e-4
    half = predict(bundle / "query.fp16.mlpackage", photos_nchw[:8], model.spec)
    assert min_cosine(half, ref) >= 0.999
