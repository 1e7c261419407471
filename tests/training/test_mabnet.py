"""MABNet: weight transfer, crop routing, the KL term, bounded ArcFace, the fixed gallery crops, the full
ViT-S/16 config, bad input, and the command end to end (table, files, export, distilled query model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.config import ConfigError
from training.data import select_classes
from training.losses import BoundedArcFace
from training.mabnet import train as mt
from training.mabnet.model import (Block, GalleryLayout, MABNet, MABNetError, MABNetModelConfig, crop_resize,
                                   descriptor, gallery_boxes, transfer_weights)
from training.transforms import fit_small_image

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.backbone=\"tiny_resnet\"", "model.pretrained=false", "model.dim=8", "model.gallery.n_local=2",
        "model.gallery.local_size=32", "crops.global_size=64", "crops.local_size=32", "crops.n_local=3",
        "data.kind=\"instances\"", "data.split=\"classes\"", "data.n_objects=8", "data.n_views=4",
        "data.image_size=64", "train.epochs=2", "train.batch_size=4", "train.max_steps=2", "eval.baseline=false"]


def tiny_cfg(tmp_path, *more: str) -> mt.MABNetConfig:
    return mt.load_mabnet_config(None, [f"out={json.dumps(str(tmp_path / 'run'))}", *TINY, *more])


def tiny_model(assistant: bool = True, **layout) -> MABNet:
    torch.manual_seed(0)
    return MABNet(MABNetModelConfig("tiny_resnet", pretrained=False, image_size=64, dim=8, assistant=assistant,
                                    gallery=GalleryLayout(**{"n_local": 2, "local_size": 32, **layout})))


def crops_batch(b: int = 3, ng: int = 2, nl: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, 64, 64, generator=g) for _ in range(ng)] + \
           [torch.randn(b, 3, 32, 32, generator=g) for _ in range(nl)]


# ------------------------------------------------------------------------------------------------ transfer


def _floats(block: Block) -> dict:
    return {k: v.clone() for k, v in block.state_dict().items() if v.is_floating_point()}


def test_transfer_arithmetic_master_and_reversed():
    model = tiny_model()
    with torch.no_grad():  # distinct BatchNorm statistics too, so buffers are checked, not only parameters
        for mod in model.assistant.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.add_(1.0)
    m0, a0 = _floats(model.master), _floats(model.assistant)
    mt.apply_transfer(model, mt.TransferConfig(lam=0.25, target="master"))
    m1, a1 = _floats(model.master), _floats(model.assistant)
    for k in m0:
        torch.testing.assert_close(m1[k], 0.25 * m0[k] + 0.75 * a0[k])
        torch.testing.assert_close(a1[k], a0[k])
    assert any("running_mean" in k and not torch.equal(m1[k], m0[k]) for k in m0)
    mt.apply_transfer(model, mt.TransferConfig(lam=0.5, target="assistant"))
    for k in m0:
        torch.testing.assert_close(_floats(model.assistant)[k], 0.5 * a1[k] + 0.5 * m1[k])
        torch.testing.assert_close(_floats(model.master)[k], m1[k])
    mt.apply_transfer(model, mt.TransferConfig(every="none"))
    with pytest.raises(MABNetError, match="lambda"):
        transfer_weights(model.master, model.assistant, 1.5)


@pytest.mark.parametrize("every, expected", [("epoch", 2), ("iteration", 4), ("none", 0)])
def test_transfer_runs_per_epoch_or_per_iteration(tmp_path, monkeypatch, every, expected):
    calls = []
    real = mt.transfer_weights
    monkeypatch.setattr(mt, "transfer_weights", lambda t, s, lam: (calls.append((t, lam)), real(t, s, lam)))
    cfg = tiny_cfg(tmp_path, f"transfer.every={json.dumps(every)}", "transfer.lam=0.3")
    splits = _splits(cfg)
    model, history = mt.train_mabnet(cfg, "row", splits.train, progress=False, log=None)
    assert len(history) == 2 and len(calls) == expected  # 2 epochs x 2 steps
    assert all(lam == 0.3 for _, lam in calls)


def _splits(cfg):
    from training.aff.train import load_splits

    return load_splits(cfg)


# ------------------------------------------------------------------------------------------------ crops and KL


def test_global_crops_reach_both_blocks_and_local_crops_only_the_master(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = tiny_model()
    model.set_classes(5)
    seen = {"master": [], "assistant": []}
    for name in seen:
        getattr(model, name).register_forward_pre_hook(lambda mod, args, n=name: seen[n].append(tuple(args[0].shape)))
    labels = torch.tensor([0, 1, 2])
    terms = mt.mabnet_losses(model, crops_batch(), labels, cfg)
    assert seen["master"] == [(6, 3, 64, 64), (9, 3, 32, 32)]  # one pass per crop size: 2 globals, 3 locals
    assert seen["assistant"] == [(6, 3, 64, 64)]
    assert {"arcface_master", "arcface_assistant", "kl", "loss"} <= set(terms)
    only = tiny_model(assistant=False)
    only.set_classes(5)
    terms = mt.mabnet_losses(only, crops_batch(), labels, cfg)
    assert "kl" not in terms and torch.allclose(terms["loss"], terms["arcface_master"])


def _kl(p_ref: torch.Tensor, p_other: torch.Tensor, t: float) -> torch.Tensor:
    a, b = F.softmax(F.normalize(p_ref, dim=-1) / t, -1), F.softmax(F.normalize(p_other, dim=-1) / t, -1)
    return (a * (a.log() - b.log())).sum(-1).mean()


def test_kl_direction_is_master_as_reference_and_sums_over_crop_pairs():
    g = torch.Generator().manual_seed(0)
    master = [torch.randn(4, 6, generator=g) for _ in range(3)]
    assistant = [torch.randn(4, 6, generator=g) for _ in range(2)]
    ref_master = mt.pairwise_kl(master, assistant, 0.5, "master")
    by_hand = sum(_kl(m, a, 0.5) for m in master for a in assistant)
    torch.testing.assert_close(ref_master, by_hand)
    ref_assistant = mt.pairwise_kl(master, assistant, 0.5, "assistant")
    torch.testing.assert_close(ref_assistant, sum(_kl(a, m, 0.5) for m in master for a in assistant))
    assert not torch.allclose(ref_master, ref_assistant)  # KL is not symmetric: the direction matters


def test_kl_trains_both_blocks_and_each_arcface_stays_in_its_block(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = tiny_model()
    model.set_classes(5)
    labels = torch.tensor([0, 1, 2])

    def grads(term: str) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        mt.mabnet_losses(model, crops_batch(), labels, cfg)[term].backward()
        norm = lambda block: sum(float(p.grad.abs().sum()) for p in block.parameters() if p.grad is not None)
        return norm(model.master), norm(model.assistant)

    m, a = grads("kl")
    assert m > 0 and a > 0
    m, a = grads("arcface_master")
    assert m > 0 and a == 0
    m, a = grads("arcface_assistant")
    assert m == 0 and a > 0


# ------------------------------------------------------------------------------------------------ ArcFace s, m


def test_bounded_arcface_s_and_m_get_gradients_and_stay_in_bounds():
    torch.manual_seed(0)
    head = BoundedArcFace(8, 4, s=30.0, m=0.3, s_bounds=(8.0, 64.0), m_bounds=(0.05, 0.6))
    assert float(head.scale.detach()) == pytest.approx(30.0, rel=1e-5) and float(head.margin.detach()) == pytest.approx(0.3, rel=1e-5)
    emb, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
    head(emb, labels).backward()
    assert head.s_raw.grad is not None and float(head.s_raw.grad) != 0
    assert head.m_raw.grad is not None and float(head.m_raw.grad) != 0
    opt = torch.optim.SGD(head.parameters(), lr=1e4)  # huge steps: the loss would push s and m anywhere
    for _ in range(20):
        opt.zero_grad()
        head(emb, labels).backward()
        opt.step()
        assert 8.0 <= float(head.scale.detach()) <= 64.0 and 0.05 <= float(head.margin.detach()) <= 0.6
    with pytest.raises(Exception, match="inside its bounds"):
        BoundedArcFace(8, 4, s=100.0)


# ------------------------------------------------------------------------------------------------ gallery crops


def test_gallery_boxes_are_the_documented_fixed_layout():
    g, l = gallery_boxes(GalleryLayout(n_global=2, n_local=8, global_side=0.8, local_side=0.5))
    assert g == [(0.0, 0.0, 0.8), pytest.approx((0.2, 0.2, 0.8))]
    assert len(l) == 8 and l[0] == (0.0, 0.0, 0.5)  # a 3 x 3 grid, row-major, the first 8 cells
    assert l[4] == pytest.approx((0.25, 0.25, 0.5)) and l[2] == pytest.approx((0.0, 0.5, 0.5))
    assert all(0 <= t <= 0.5 and 0 <= x <= 0.5 for t, x, _ in l)  # inside the image
    assert gallery_boxes(GalleryLayout(n_global=1, n_local=0)) == ([pytest.approx((0.1, 0.1, 0.8))], [])


def test_gallery_descriptor_is_deterministic_and_built_from_the_crops():
    model = tiny_model(n_global=2, n_local=2).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, model(x)) and out.shape == (2, 5 * 8) == (2, model.embedding_dim)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
        g, l = gallery_boxes(model.config.gallery)
        views = [x] + [crop_resize(x, b, (64, 64)) for b in g]
        parts = [F.normalize(model.master(v), dim=-1) for v in views]
        parts += [F.normalize(model.master(crop_resize(x, b, (32, 32))), dim=-1) for b in l]
        torch.testing.assert_close(out, F.normalize(torch.cat(parts, 1), dim=-1), atol=1e-5, rtol=1e-4)
        assert torch.equal(crop_resize(x, (0.0, 0.0, 0.5), (32, 32)), x[:, :, :32, :32])  # a slice, no resampling
        original = model.with_view(gallery=GalleryLayout(n_global=0, n_local=0))(x)
        torch.testing.assert_close(original, F.normalize(model.master(x), dim=-1))
        assert model.embedding_dim == 8
        combined = model.with_view("combined", GalleryLayout(n_global=1, n_local=0))(x)
        assert combined.shape == (2, 2 * 2 * 8)


# ------------------------------------------------------------------------------------------------ bad input


def test_small_images_are_upscaled_or_refused():
    img = Image.new("RGB", (28, 40))
    assert fit_small_image(img, 64, "upscale").size == (64, 91)
    assert fit_small_image(Image.new("RGB", (80, 90)), 64, "error").size == (80, 90)
    with pytest.raises(Exception, match="smaller than the 64 px crop"):
        fit_small_image(img, 64, "error")


def test_multicrop_dino_photometric_options_and_small_image_upscale():
    from sdk.preprocess import PreprocessSpec
    from training.transforms import MultiCropTransform

    spec = PreprocessSpec(input_size=(64, 64))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8))  # smaller than the 64 px crop
    crops = MultiCropTransform(spec, n_global=2, global_size=64, n_local=3, local_size=32, color_jitter=0.0,
                               grayscale=1.0, seed=0)(img)
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
    pixels = crops[0] * std + mean  # grayscale: the three channels are equal again
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-2, rtol=0)
    with pytest.raises(Exception, match="smaller than the 64 px crop"):
        MultiCropTransform(spec, global_size=64, local_size=32, small_images="error")(img)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'nope'"):
        tiny_cfg(tmp_path, "crops.nope=1")
    with pytest.raises(ConfigError, match="unknown ablation"):
        tiny_cfg(tmp_path, "ablations=[\"bogus\"]")
    with pytest.raises(ConfigError, match="transfer.every"):
        tiny_cfg(tmp_path, "transfer.every=\"sometimes\"")
    with pytest.raises(ConfigError, match="kl_reference"):
        tiny_cfg(tmp_path, "loss.kl_reference=\"both\"")
    with pytest.raises(ConfigError, match="crops.global_size"):
        tiny_cfg(tmp_path, "model.image_size=32")


def test_a_bad_query_section_is_refused_before_any_training(tmp_path):
    cfg = tiny_cfg(tmp_path, 'query={"procedural": {"seed": 0}, "epochs": 1}')  # data.seed is 0 too
    with pytest.raises(ConfigError, match="procedural.seed 0 equals data.seed"):
        mt.run_mabnet(cfg, progress=False, log=None)
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("*.safetensors"))


def test_resuming_with_another_class_count_is_an_error(tmp_path, interrupt_at):
    cfg = tiny_cfg(tmp_path)
    splits = _splits(cfg)
    restore = interrupt_at(mt, "mabnet_losses", 3)  # dies in epoch 2, after epoch 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        mt.train_mabnet(cfg, "row", splits.train, progress=False, log=None)
    restore()
    fewer = select_classes(splits.train, [0, 1, 2])
    with pytest.raises(MABNetError, match="trained with 6 classes but this data has 3"):
        mt.train_mabnet(cfg, "row", fewer, progress=False, log=None)
    model, history = mt.train_mabnet(cfg, "row", splits.train, progress=False, log=None)  # same data: resumes
    assert len(history) == 2


# ------------------------------------------------------------------------------------------------ full config


def test_full_vit_config_runs_one_training_step(tmp_path):
    cfg = mt.load_mabnet_config(ROOT / "configs" / "mabnet_full.json", [
        f"out={json.dumps(str(tmp_path / 'full'))}", "model.pretrained=false", "data.n_objects=3", "data.n_views=2",
        "data.image_size=224", "train.epochs=1", "train.batch_size=2", "train.max_steps=1"])
    assert cfg.model.backbone == "vit_small_patch16_224" and cfg.crops.global_size == 224
    assert (cfg.crops.n_global, cfg.crops.n_local, cfg.crops.local_size, cfg.model.dim) == (2, 8, 96, 512)
    splits = _splits(cfg)
    model, history = mt.train_mabnet(cfg, "step", splits.train, progress=False, log=None)
    assert len(history) == 1 and math.isfinite(history[0]["loss"]) and history[0]["kl"] > 0
    assert model.embedding_dim == 11 * 512


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_full_vit_config_trains_on_cuda(tmp_path):
    cfg = mt.load_mabnet_config(ROOT / "configs" / "mabnet_full.json", [
        f"out={json.dumps(str(tmp_path / 'full'))}", "model.pretrained=false", "data.n_objects=3", "data.n_views=4",
        "data.image_size=224", "train.epochs=1", "train.batch_size=4", "train.max_steps=2"])
    _, history = mt.train_mabnet(cfg, "cuda", _splits(cfg).train, device="cuda", progress=False, log=None)
    assert math.isfinite(history[0]["loss"])


# ------------------------------------------------------------------------------------------------ end to end


def test_command_prints_the_table_writes_files_and_exports(tmp_path):
    from typer.testing import CliRunner

    from export.bundle import export_bundle
    from sdk.cli import app
    from training.checkpoint import load_checkpoint

    query = {"student": {"backbone": "tiny_resnet", "pretrained": False, "image_size": 64}, "epochs": 1,
             "batch_size": 8, "average_epochs": [1], "max_images": 40, "teacher_cache": None,
             "eval": {"scales": [1.0], "whiten": False}}
    args = ["train", "mabnet", "--out", str(tmp_path / "run"), "--ablation", "master_only", "--ablation", "no_transfer",
            "--lambda", "0.5", "--lambda", "0.9", "--no-progress", "--set", f"query={json.dumps(query)}"]
    for item in TINY:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for row in ("mabnet (lambda=0.5, per epoch)", "mabnet + aqe", "mabnet + alpha_qe", "mabnet + diffusion",
                "master_only", "no_transfer", "lambda=0.9", "orig-only", "MABNet(C)", "asym/sym"):
        assert row in result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["run"].split(" ")[0] for r in results["rows"]][:4] == ["mabnet", "mabnet", "mabnet", "mabnet"]
    assert results["query"]["asymmetric_map"] is not None
    model, meta = load_checkpoint(tmp_path / "run" / "mabnet.safetensors", expect="mabnet")
    assert model.embedding_dim == 5 * 8 and meta.role == "gallery" and model.master_arcface is None
    combined, _ = load_checkpoint(tmp_path / "run" / "mabnet_combined.safetensors", expect="mabnet")
    assert combined.embedding_dim == 2 * 5 * 8
    manifest = export_bundle(tmp_path / "run" / "query" / "student.safetensors", tmp_path / "bundle",
                             gallery_checkpoint=tmp_path / "run" / "mabnet.safetensors")
    assert manifest.models["gallery"].embedding_dim == 40
    parity = manifest.extra["export"]["parity"]["gallery.onnx"]
    assert parity["images"] > 0 and parity["max_abs_diff"] <= 1e-4, parity


# ------------------------------------------------------------------------------------------------ AFF extractor


def test_mabnet_is_an_aff_extractor_kind(tmp_path):
    from typer.testing import CliRunner

    from sdk.cli import app
    from training.checkpoint import CheckpointMeta, save_checkpoint
    from training.extractors import ExtractorConfig, ExtractorError, build_extractor, load_extractor, save_extractor

    model = tiny_model().eval()
    path = save_checkpoint(model, tmp_path / "mabnet.safetensors", CheckpointMeta(role="gallery", name="mabnet"))
    ec = ExtractorConfig.from_dict({"kind": "mabnet", "name": "mabnet", "weights": str(path), "train": {"epochs": 0}})
    ex = build_extractor(ec, num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ex.extract(x).global_, model(x))
    assert ex.global_dim == model.embedding_dim == 5 * 8
    saved = load_extractor(save_extractor(ex, tmp_path / "ex.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(saved.extract(x).global_, model(x))
    with pytest.raises((ExtractorError, ConfigError), match="train.epochs to 0"):
        ExtractorConfig.from_dict({"kind": "mabnet", "weights": str(path)})  # default epochs: 2

    mabnet_ex = {"kind": "mabnet", "name": "mabnet", "weights": str(path), "train": {"epochs": 0}}
    tiny_aff = ["data.n_objects=6", "data.n_views=4", "data.image_size=48", "data.split=images", "data.held_out=0.5",
                "extractors.0.backbone=tiny_resnet", "extractors.1.backbone=tiny_efficientnet",
                f"extractors.2={json.dumps(mabnet_ex)}",
                *[f"extractors.{i}.train.{k}" for i in range(2) for k in ("epochs=1", "batch_size=8")],
                "train.epochs=1", "train.mixer_epochs=1", "train.batch_size=8", "baseline.epochs=1",
                "embedding_dim=32", "mixer.dim=32", "mixer.depth=1", "query.image_size=64", "extract_batch_size=16",
                "ablations=[]"]
    args = ["train", "aff", "--config", str(ROOT / "configs" / "aff_small_instances.json"), "--out",
            str(tmp_path / "aff"), "--no-progress", *[a for o in tiny_aff for a in ("--set", o)]]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "mabnet: MABNET on tiny_resnet" in result.output or "mabnet: MABNET" in result.output, result.output
    report = json.loads((tmp_path / "aff" / "results.json").read_text())
    assert any(r.get("name", r.get("run", "")).startswith("mabnet") for r in report["rows"]), report["rows"]
