"""The on-device Embedder: bundle -> preprocessing spec -> ONNX Runtime / LiteRT -> L2-normalised rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sdk.bundle import BundleError
from sdk.embedder import MULTI_SCALES, BackendError, Embedder
from sdk.preprocess import ImageError, preprocess_batch

ONNX_TOL = 1e-4  # fp32 ONNX vs the torch model it was exported from (cosine distance)
TFLITE_TOL = 1e-3  # fp32 TFLite vs ONNX


@pytest.fixture(scope="module")
def photos(ukbench_dir):
    return sorted(ukbench_dir.glob("*.jpg"))[:6]


def test_matches_torch_model_and_is_normalised(tiny_bundle, photos):
    import torch

    from training.models import load_checkpoint

    emb = Embedder.from_bundle(tiny_bundle)
    assert emb.space == "test-space" and emb.dim == 32 and emb.role == "query"
    got = emb.embed(photos, batch_size=4)
    assert got.shape == (6, 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    model, _ = load_checkpoint(tiny_bundle.parent / "ckpt" / "query.pt")
    with torch.no_grad():
        ref = model(torch.from_numpy(preprocess_batch(photos, model.spec))).numpy()
    assert (1 - (got * ref).sum(1)).max() < ONNX_TOL


def test_single_batched_and_input_types_agree(tiny_bundle, photos):
    emb = Embedder.from_bundle(tiny_bundle, role="gallery", threads=1, workers=2)
    batch = emb.embed(photos, batch_size=3)
    one = emb.embed_one(photos[0])
    np.testing.assert_allclose(one, batch[0], atol=1e-6)
    pil = Image.open(photos[1]).convert("RGB")
    np.testing.assert_allclose(emb.embed_one(pil), batch[1], atol=1e-6)
    np.testing.assert_allclose(emb.embed_one(np.asarray(pil)), batch[1], atol=1e-6)
    np.testing.assert_allclose(emb.embed_one(photos[1].read_bytes()), batch[1], atol=1e-6)
    assert emb.embed([]).shape == (0, 32)


def test_multiscale_and_multicrop(tiny_bundle, photos):
    base = Embedder.from_bundle(tiny_bundle).embed(photos[:2])
    for kwargs in ({"multiscale": True}, {"crops": "five"}, {"crops": "ten", "multiscale": True, "scale_power": 3.0}):
        emb = Embedder.from_bundle(tiny_bundle, **kwargs)
        out = emb.embed(photos[:2])
        assert out.shape == (2, 32) and np.isfinite(out).all()
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        assert ((out * base).sum(1) > 0.9).all()  # an augmentation of the same image, not something else
    assert Embedder.from_bundle(tiny_bundle, multiscale=True).scales == MULTI_SCALES
    with pytest.raises(ValueError, match="crops"):
        Embedder.from_bundle(tiny_bundle, crops="seven")


def test_bad_images_give_one_line_errors(tiny_bundle, tmp_path, photos):
    emb = Embedder.from_bundle(tiny_bundle)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg"):
        emb.embed([photos[0], bad])
    with pytest.raises(ImageError, match="uint8"):
        emb.embed_one(np.zeros((8, 8, 3), np.float32))
    vectors, ok, errors = emb.embed_valid([photos[0], bad, photos[1]])
    assert vectors.shape == (2, 32) and ok == [0, 2] and errors[0][0] == 1
    # one image where a list is expected: an error naming embed_one, not its characters/rows as "images"
    for one in (str(photos[0]), photos[0], np.zeros((8, 8, 3), np.uint8)):
        with pytest.raises(TypeError, match="embed_one"):
            emb.embed(one)
    assert emb.embed(np.zeros((2, 8, 8, 3), np.uint8)).shape == (2, 32)  # an (N, H, W, 3) batch is a list


def test_missing_backend_file_and_bad_backend(tiny_bundle):
    with pytest.raises(BundleError, match="no tflite file"):
        Embedder.from_bundle(tiny_bundle, backend="tflite")
    with pytest.raises(ValueError, match="backend"):
        Embedder.from_bundle(tiny_bundle, backend="torch")


def _tflite_bundle(tiny_bundle, out):
    """A bundle with a real .tflite query model, if export/ can write one here (else None)."""
    from export.bundle import export_bundle

    ckpt = tiny_bundle.parent / "ckpt"
    try:
        manifest = export_bundle(ckpt / "query.pt", out, gallery_checkpoint=ckpt / "gallery.pt",
                                 formats=("onnx", "tflite"))
    except Exception:  # noqa: BLE001  (TFLite export not available on this machine)
        return None
    has = any(f.format == "tflite" for f in manifest.model("query").files)
    return out if has else None


def test_tflite_backend_or_clear_error(tiny_bundle, tmp_path, photos):
    """With LiteRT installed and a bundle holding a .tflite file, both backends agree; otherwise the
    tflite backend says exactly what to install."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401

        have_litert = True
    except ImportError:
        have_litert = False
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    (bundle / "query.tflite").write_bytes(b"TFL3 not really a model")
    data["models"]["query"]["files"].append({"path": "query.tflite", "format": "tflite", "precision": "fp32",
                                             "layout": "NHWC", "batch": "1"})
    (bundle / "manifest.json").write_text(json.dumps(data))
    if not have_litert:
        with pytest.raises(BackendError, match="pip install ai-edge-litert"):
            Embedder.from_bundle(bundle, backend="tflite")
        return
    with pytest.raises(BackendError, match="LiteRT cannot load"):
        Embedder.from_bundle(bundle, backend="tflite")
    real = _tflite_bundle(tiny_bundle, tmp_path / "real")
    if real is not None:
        onnx = Embedder.from_bundle(real).embed(photos[:3])
        lite = Embedder.from_bundle(real, backend="tflite").embed(photos[:3])
        assert (1 - (onnx * lite).sum(1)).max() < TFLITE_TOL
