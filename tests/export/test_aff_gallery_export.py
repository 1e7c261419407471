"""An AFF gallery (extractors + mixer) goes save -> `retrieval-sdk export` -> one ONNX graph, matches torch,
and `retrieval-sdk index build` embeds a gallery with it where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from .conftest import make_checkpoint

SPACE = "aff-export-space"
DIM = 32


@pytest.fixture(scope="module")
def aff_run(tmp_path_factory):
    """A tiny AFF gallery (DELG with local features at 64 px, DOLG and CVNet at 48 px) saved next to a
    query model of the same space, and a folder of gallery images."""
    import torch

    from training.aff.gallery import save_gallery
    from training.aff.mixer import DynamicMixer, FeatureSpec, MixerArch
    from training.data import make_instance_set
    from training.extractors import ExtractorConfig, build_extractor

    d = tmp_path_factory.mktemp("aff")
    torch.manual_seed(0)
    extractors = [build_extractor(ExtractorConfig("delg", backbone="tiny_resnet", image_size=64, dim=24,
                                                  local_dim=8, num_local=6, attention_hidden=16), num_classes=4),
                  build_extractor(ExtractorConfig("dolg", backbone="tiny_efficientnet", image_size=48, dim=16,
                                                  local_dim=16, dilations=(1, 2)), num_classes=4),
                  build_extractor(ExtractorConfig("cvnet", backbone="tiny_resnet", image_size=48, dim=16,
                                                  scales=(0.75, 1.0)))]
    specs = (FeatureSpec("delg", 24), FeatureSpec("delg", 8, local=True, tokens=6), FeatureSpec("dolg", 16),
             FeatureSpec("cvnet", 16))
    mixer = DynamicMixer(MixerArch(inputs=specs, dim=32, depth=1, heads=4, embedding_dim=DIM)).eval()
    gallery = save_gallery(d / "gallery.safetensors", mixer, [e.eval() for e in extractors], SPACE)
    query = make_checkpoint(d / "query.safetensors", dim=DIM, space=SPACE)
    images = make_instance_set(d / "images", n_objects=3, n_views=3, image_size=72, seed=0)
    return d, query, gallery, images


def test_aff_gallery_exports_as_one_onnx_graph_matching_torch(aff_run, tmp_path):
    from export.bundle import export_bundle
    from sdk.backends import onnx_session as session
    from training.aff.gallery import load_gallery

    d, query, gallery_path, _ = aff_run
    manifest = export_bundle(query, d / "bundle", gallery_checkpoint=gallery_path)
    entry = manifest.model("gallery")
    assert [f.path for f in entry.files] == ["gallery.onnx"] and entry.embedding_dim == DIM
    parity = manifest.extra["export"]["parity"]["gallery.onnx"]
    assert parity["images"] > 0 and parity["max_abs_diff"] <= 1e-4, parity

    gallery = load_gallery(gallery_path)
    h, w = gallery.spec.input_size
    x = np.random.default_rng(1).normal(size=(3, 3, h, w)).astype(np.float32)  # another batch size than traced
    import torch

    with torch.no_grad():
        ref = gallery(torch.from_numpy(x)).numpy()
    got = session(d / "bundle" / "gallery.onnx").run(None, {"image": x})[0]
    assert got.shape == (3, DIM) and np.abs(got - ref).max() <= 1e-4


def test_index_build_embeds_a_gallery_with_the_aff_graph_without_torch(aff_run, tmp_path):
    from sdk.ingest import list_images
    from training.aff.gallery import load_gallery

    d, _, gallery_path, images = aff_run
    bundle = d / "bundle"
    if not (bundle / "gallery.onnx").is_file():
        from export.bundle import export_bundle

        export_bundle(aff_run[1], bundle, gallery_checkpoint=gallery_path)
    paths = [str(p) for p in list_images(d / "images")]
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "timm", "torchvision", "training", "export"):
            sys.modules[name] = None  # importing any of them now fails
        import numpy as np
        from sdk.cli import app
        from sdk import Embedder
        app(["index", "build", {str(bundle)!r}, {str(d / 'images')!r}, "--index", {str(tmp_path / 'idx')!r},
             "--no-progress"], standalone_mode=False)
        np.save({str(tmp_path / 'emb.npy')!r}, Embedder.from_bundle({str(bundle)!r}, role="gallery").embed({paths!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(paths)} images: {len(paths)} added" in proc.stdout + proc.stderr
    ref = load_gallery(gallery_path).embed_images(paths)
    got = np.load(tmp_path / "emb.npy")
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4
    assert json.loads((bundle / "manifest.json").read_text())["embedding_space"] == SPACE
