"""Compatibility fine-tune: the closed-form head fit and end-to-end distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.compatible import CompatConfig, fit_linear_map, train_compatible
from training.data import make_instance_set
from training.embed import embed_images
from training.models import EmbeddingModel, ModelConfig


def test_fit_linear_map_recovers_a_known_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    w_true, b_true = rng.normal(size=(3, 6)), rng.normal(size=3)
    w, b = fit_linear_map(x, (x @ w_true.T + b_true).astype(np.float32), ridge=1e-8)
    np.testing.assert_allclose(w, w_true, atol=1e-4)
    np.testing.assert_allclose(b, b_true, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    return make_instance_set(tmp_path_factory.mktemp("proc"), n_objects=6, n_views=3, image_size=64, seed=1).paths


def test_fit_brings_query_into_gallery_space(tiny_images):
    torch.manual_seed(0)
    gallery = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8)).eval()
    query = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=8)).eval()

    def cosine_to_gallery() -> float:
        g = embed_images(gallery, tiny_images, gallery.spec, progress=False)
        q = embed_images(query, tiny_images, query.spec, progress=False)
        return float((g * q).sum(1).mean())

    before = cosine_to_gallery()
    history = train_compatible(query, gallery, gallery.spec, tiny_images, CompatConfig(views=2, ridge=1e-3),
                               progress=False)
    after = cosine_to_gallery()
    assert after > 0.9 and after > before + 0.3, (before, after)
    assert history["fit_cosine_loss"] < 0.1 and history["epoch_losses"] == []


def test_end_to_end_epochs_run_and_report_losses(tiny_images):
    gallery = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8)).eval()
    query = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=8))
    before = {k: v.clone() for k, v in query.backbone.state_dict().items()}
    history = train_compatible(query, gallery, gallery.spec, tiny_images,
                               CompatConfig(views=1, epochs=2, batch_size=8), progress=False)
    assert len(history["epoch_losses"]) == 2 and all(np.isfinite(history["epoch_losses"]))
    changed = [k for k, v in query.backbone.state_dict().items() if "weight" in k and not torch.equal(v, before[k])]
    assert changed, "end-to-end epochs must update the backbone"
    # BatchNorm statistics stay frozen during fine-tuning
    assert all(torch.equal(v, before[k]) for k, v in query.backbone.state_dict().items() if "running_" in k)


def test_without_the_closed_form_fit_the_query_keeps_its_own_fc(tiny_images):
    """closed_form off (a query model that inherits the gallery's whitening): no crop is embedded, the FC is
    untouched, and a query model without an FC (a CGD head) is accepted for the end-to-end epochs."""
    gallery = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8)).eval()
    query = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8))
    query.load_state_dict(gallery.state_dict())
    history = train_compatible(query, gallery, gallery.spec, tiny_images, CompatConfig(closed_form=False), progress=False)
    assert history == {"fit_cosine_loss": None, "pairs": 0, "epoch_losses": []}
    assert all(torch.equal(v, gallery.state_dict()[k]) for k, v in query.state_dict().items())
    cgd = EmbeddingModel(ModelConfig("tiny_efficientnet", "cgd", embedding_dim=8, cgd_config="SG"))
    history = train_compatible(cgd, gallery, gallery.spec, tiny_images,
                               CompatConfig(closed_form=False, epochs=1, batch_size=8), progress=False)
    assert len(history["epoch_losses"]) == 1 and np.isfinite(history["epoch_losses"][0])
    with pytest.raises(ValueError, match="needs a whitening FC"):
        train_compatible(cgd, gallery, gallery.spec, tiny_images, CompatConfig(), progress=False)


def test_dimension_mismatch_is_explained(tiny_images):
    gallery = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8))
    query = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=16))
    with pytest.raises(ValueError, match="query model dim 16 != gallery dim 8"):
        train_compatible(query, gallery, gallery.spec, tiny_images, CompatConfig(), progress=False)


def test_crops_are_cut_one_image_at_a_time_and_land_in_plan_order(tiny_images, monkeypatch):
    """The fit sees exactly the crops it always drew, while at most `chunk` crops are held at once."""
    import random

    import training.compatible as compatible
    from sdk.preprocess import load_image

    model = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=8)).eval()
    images = list(tiny_images[:5])
    plan = compatible._crop_plan(images, CompatConfig(), random.Random(0), views=3)
    assert len(plan) == 5 * 4 and [box for _, box in plan[:5]] == [None] * 5
    everything = [compatible._cut(load_image(source), box) for source, box in plan]
    expected = embed_images(model.pooled, everything, model.spec, progress=False)

    batches, loads = [], []
    real_embed, real_load = compatible.embed_images, compatible.load_image
    monkeypatch.setattr(compatible, "embed_images", lambda m, b, *a, **k: batches.append(len(b)) or real_embed(m, b, *a, **k))
    monkeypatch.setattr(compatible, "load_image", lambda s: loads.append(s) or real_load(s))
    (got,) = compatible._embed_crops(plan, [(model.pooled, model.spec)], progress=False, chunk=3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert max(batches) <= 3 and sum(batches) == len(plan)
    assert sorted(map(str, loads)) == sorted(map(str, images)), "each source image is decoded once"


def test_end_to_end_epochs_decode_images_batch_by_batch(tiny_images, monkeypatch):
    """The --epochs path holds sources, not decoded images: each image is decoded once per epoch, in its batch."""
    import random

    import training.compatible as compatible
    from PIL import Image

    loads, real_load = [], compatible.load_image
    monkeypatch.setattr(compatible, "load_image", lambda s: loads.append(s) or real_load(s))
    model = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=8))
    pairs = compatible._CropPairs(list(tiny_images), CompatConfig(batch_size=4), random.Random(0), model.spec, model.spec)
    assert not loads and not any(isinstance(i, Image.Image) for i in pairs.images)
    for _epoch in range(2):
        loads.clear()
        seen = 0
        for x_query, _ in pairs:
            seen += len(x_query)
            assert len(loads) == seen  # decoded as its batch is cut, not before
        assert sorted(map(str, loads)) == sorted(map(str, tiny_images))


def test_end_to_end_epochs_train_on_the_photos_too(tiny_images, monkeypatch):
    """`photos` join the end-to-end epochs as well as the closed-form fit (they used to train the head only):
    with no extra crops, each image and each photo is decoded once for the fit and once for the one epoch."""
    import training.compatible as compatible

    loads, real_load = [], compatible.load_image
    monkeypatch.setattr(compatible, "load_image", lambda s: loads.append(str(s)) or real_load(s))
    gallery = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8)).eval()
    query = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=8)).eval()
    images, photos = list(tiny_images[:4]), list(tiny_images[4:7])
    history = train_compatible(query, gallery, gallery.spec, images,
                               CompatConfig(views=0, photo_views=0, epochs=1, batch_size=8), progress=False, photos=photos)
    assert len(history["epoch_losses"]) == 1
    assert sorted(loads) == sorted(2 * [str(p) for p in images + photos])


@pytest.mark.slow
def test_huge_photos_do_not_exhaust_memory(tmp_path):
    """Regression: 40 full-resolution crops of every 5120x2880 wallpaper used to be held at once (OOM-killed
    at tens of GiB). Here: four 4000x3000 photos x 31 crops
    peaked at 6.2 GB held at once and at 1 GB cut one photo at a time; the bound is 3.5 GB."""
    import subprocess
    import sys
    import textwrap

    from PIL import Image

    ramp = np.linspace(0, 255, 4000, dtype=np.uint8)
    for i in range(4):
        pixels = np.stack([np.tile(ramp, (3000, 1)), np.tile(ramp[::-1], (3000, 1)), np.full((3000, 4000), 40 * i, np.uint8)], -1)
        Image.fromarray(pixels).save(tmp_path / f"photo{i}.jpg", quality=80)
    script = textwrap.dedent(f"""
        import re
        from pathlib import Path
        from training.compatible import CompatConfig, train_compatible
        from training.models import EmbeddingModel, ModelConfig
        gallery = EmbeddingModel(ModelConfig("tiny_efficientnet", "gem", embedding_dim=8)).eval()
        query = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=8)).eval()
        photos = sorted(Path({str(tmp_path)!r}).glob("*.jpg"))
        h = train_compatible(query, gallery, gallery.spec, [], CompatConfig(photo_views=30), progress=False, photos=photos)
        # VmHWM, not ru_maxrss: the latter keeps the parent's (pytest's) peak across exec
        print(h["pairs"], int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    pairs, peak_mib = map(int, out.stdout.split()[-2:])
    assert pairs == 4 * 31
    assert peak_mib < 3500, f"peak RSS {peak_mib} MiB: crops are being held all at once again"


def test_a_crop_keeps_the_photo_aspect_and_resolution_up_to_the_cap():
    from PIL import Image

    import training.compatible as compatible

    small, big = Image.new("RGB", (640, 480)), Image.new("RGB", (5120, 2880))
    assert compatible._cut(small, (10, 10, 200, 300)).size == (640, 480)
    assert compatible._cut(big, (0, 0, 1000, 900)).size == (round(5120 * 1536 / 2880), 1536)
    assert compatible._cut(big, None) is big
