"""`train cgd`: the P x K sampler, stride-1 removal, the classifier on the first branch only, a tiny run end to
end (its table, files, resume and the quickstart gallery path), and one-line errors for bad input."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import training.cgd as cgd
from training.aff.config import DataConfig
from training.config import ConfigError
from training.backbones import create_backbone
from training.checkpoint import load_checkpoint, read_header
from training.errors import TrainingError
from training.heads import CGDHead
from training.losses import label_smoothing_cross_entropy
from training.samplers import PKSampler


# ------------------------------------------------------------------------------------------------ sampler


def test_pk_sampler_yields_k_images_of_each_of_p_classes():
    labels = [c for c in range(6) for _ in range(5)]  # 6 classes x 5 images
    sampler = PKSampler(labels, p=3, k=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 30 // 12
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}
        assert len(set(batch)) == 12  # K distinct images of each class
    # the same seed and epoch give the same batches (a resumed run replays them); the next epoch differs
    again = PKSampler(labels, p=3, k=4, seed=1)
    assert list(again) == batches and list(again) != batches


def test_pk_sampler_small_classes_error_repeat_or_drop():
    labels = [0] * 4 + [1] * 4 + [2] * 2 + [3]  # class 2 has 2 images, class 3 one
    with pytest.raises(TrainingError, match=r"2 of 4 classes have fewer than K=4 images.*'repeat'.*'drop'"):
        PKSampler(labels, p=2, k=4)
    repeat = PKSampler(labels, p=3, k=4, small_classes="repeat", batches=5)
    assert repeat.repeated == [2] and repeat.dropped == [3]  # one image cannot hold a positive pair
    for batch in repeat:
        counts = Counter(labels[i] for i in batch)
        assert set(counts.values()) == {4} and 3 not in counts
    drop = PKSampler(labels, p=2, k=4, small_classes="drop", batches=5)
    assert drop.classes == [0, 1] and all({labels[i] for i in b} == {0, 1} for b in drop)
    with pytest.raises(TrainingError, match="lower P to at most 2"):
        PKSampler(labels, p=3, k=4, small_classes="drop")


def test_pk_sampler_needs_two_classes():
    with pytest.raises(TrainingError, match="has 1 class.*at least 2 labelled classes"):
        PKSampler([0] * 8, p=2, k=4)
    with pytest.raises(TrainingError, match="P >= 2 classes and K >= 2"):
        PKSampler([0, 0, 1, 1], p=2, k=1)


# ------------------------------------------------------------------------------------------------ backbone


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_efficientnet", "mobilenetv2_100", "efficientnet_lite0",
                                  "shufflenet_v2_x1_0"])
def test_stride_1_removal_doubles_the_last_feature_map(name):
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        plain = create_backbone(name).eval()(x)
        bb = create_backbone(name, last_stride=1).eval()
        wide = bb(x)
    assert plain.shape[2:] == (4, 3) and wide.shape[2:] == (8, 6)
    assert wide.shape[1] == plain.shape[1] == bb.num_features
    # the same weights: only strides changed, so pretrained checkpoints still load
    assert {k: v.shape for k, v in bb.state_dict().items()} == \
        {k: v.shape for k, v in create_backbone(name).state_dict().items()}


def test_stride_1_removal_needs_a_cnn():
    with pytest.raises(TrainingError, match="tiny_vit.*no stride-16 -> stride-32 stage"):
        create_backbone("tiny_vit", last_stride=1)
    with pytest.raises(TrainingError, match="last_stride must be 2"):
        create_backbone("tiny_resnet", last_stride=4)


# ------------------------------------------------------------------------------------------------ losses


def test_only_the_first_branch_feeds_the_classifier():
    torch.manual_seed(0)
    head = CGDHead(8, gd_config="MS", feature_dim=16, num_classes=3)
    fmap = (torch.rand(4, 8, 5, 5) + 0.1).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0])
    _, logits = head.forward_train(fmap)
    label_smoothing_cross_entropy(logits, labels, 0.1, 0.5).backward()
    # MAC (the first letter) passes gradient to each channel's maximum only; SPoC would spread it everywhere
    grad = fmap.grad.flatten(2)
    at_max = torch.zeros_like(grad).scatter_(2, fmap.detach().flatten(2).argmax(2, keepdim=True), 1.0).bool()
    assert grad[at_max].abs().sum() > 0 and grad[~at_max].abs().sum() == 0
    assert all(fc.weight.grad is None for fc in head.projections)  # no branch FC feeds the classifier
    # and the other order: SPoC first gives every position the same gradient
    head = CGDHead(8, gd_config="SM", feature_dim=16, num_classes=3)
    fmap.grad = None
    label_smoothing_cross_entropy(head.forward_train(fmap)[1], labels).backward()
    assert torch.allclose(fmap.grad, fmap.grad[..., :1, :1].expand_as(fmap.grad))


def test_cgd_losses_are_triplet_plus_smoothed_tempered_ce():
    torch.manual_seed(0)
    head = CGDHead(8, gd_config="SG", feature_dim=16, num_classes=2)
    fmap, labels = torch.rand(4, 8, 3, 3), torch.tensor([0, 0, 1, 1])
    base = cgd.cgd_losses(head, fmap, labels, cgd.CGDLossConfig(smoothing=0.0, temperature=1.0))
    torch.testing.assert_close(base["loss"], base["triplet"] + base["ce"])
    _, logits = head.forward_train(fmap)
    torch.testing.assert_close(base["ce"], torch.nn.functional.cross_entropy(logits, labels))
    tempered = cgd.cgd_losses(head, fmap, labels, cgd.CGDLossConfig(smoothing=0.1, temperature=0.5))
    want = torch.nn.functional.cross_entropy(logits / 0.5, labels, label_smoothing=0.1)
    torch.testing.assert_close(tempered["ce"], want)
    torch.testing.assert_close(tempered["triplet"], base["triplet"])
    only_ce = cgd.cgd_losses(head, fmap, labels, cgd.CGDLossConfig(triplet_weight=0.0))
    torch.testing.assert_close(only_ce["loss"], only_ce["ce"])


def test_pca_init_points_each_branch_fc_at_its_pooled_principal_directions():
    from PIL import Image

    torch.manual_seed(0)
    cfg = cgd.CGDConfig(model=cgd.CGDModelConfig("tiny_resnet", pretrained=False, image_size=32, descriptors="SM",
                                                 dim=8))
    model = cgd.build_model(cfg, "SM")
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=gen) * 255).byte().numpy()) for _ in range(12)]
    cgd.init_projections_pca(model, images, progress=False)
    from training.embed import embed_images

    fmaps = embed_images(model.backbone, images, model.spec, progress=False)
    for pool, fc in zip(model.pool.poolings, model.pool.projections):
        x = pool(torch.from_numpy(fmaps)).double()
        top = torch.linalg.svd(x, full_matrices=False)[2][0]
        w = fc.weight.detach().double()
        gram = w @ w.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-6, rtol=0)  # orthogonal rows
        assert abs(float(torch.nn.functional.cosine_similarity(w[0], top, dim=0))) > 0.999
        assert torch.all(torch.diagonal(gram)[1:] >= torch.diagonal(gram)[:-1] - 1e-9)  # weaker ones scaled up


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("change, message", [
    (["model.descriptors=\"SXG\""], r"'SXG' must be letters S \(SPoC\), M \(MAC\), G \(GeM\)"),
    (["ablations=[\"MQ\"]"], r"'MQ' must be letters"),
    (["model.descriptors=\"SMG\"", "model.dim=512"], r"total dim 512 is not divisible by the 3 branches of 'SMG'"),
    (["ablations=[\"SMG\"]"], r"total dim 512 is not divisible by the 3 branches"),
    (["model.descriptors=\"GG\""], "repeats a letter"),
    (["sampler.k=1"], "sampler.k must be >= 2, got 1"),
    (["model.last_stride=3"], "last_stride must be 1"),
    (["model.head_init=\"zeros\""], "head_init must be 'pca' or 'random'"),
    (["model.bogus=1"], "model: unknown key 'bogus'"),
])
def test_bad_configs_are_one_line_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        cgd.load_cgd_config(None, change)


# ------------------------------------------------------------------------------------------------ the run


def tiny_config(tmp_path: Path, **changes) -> cgd.CGDConfig:
    cfg = cgd.CGDConfig(
        out=str(tmp_path / "run"),
        data=DataConfig(kind="instances", split="classes", n_objects=8, n_views=4, image_size=32, held_out=0.5,
                        train_limit=None, eval_limit=None),
        model=cgd.CGDModelConfig("tiny_resnet", pretrained=False, image_size=32, descriptors="SG", dim=16),
        sampler=cgd.SamplerConfig(p=2, k=4), train=cgd.CGDTrainConfig(epochs=2, lr=1e-3))
    return replace(cfg, **changes)


def test_a_run_prints_one_table_and_writes_loadable_models(tmp_path):
    lines: list[str] = []
    cfg = tiny_config(tmp_path, ablations=("M", "SG"))
    results = cgd.run_cgd(cfg, progress=False, log=lines.append)
    out = Path(cfg.out)
    assert [r["run"] for r in results["rows"]] == ["pretrained + GeM (no training)", "CGD SG", "CGD M"]
    assert results["n_train"] == 16 and results["n_eval"] == 16  # 4 objects each side, unseen at evaluation
    table = lines[-2]  # then the "wrote ..." line
    assert table.split("\n")[0].split() == ["model", "R@1", "R@2", "R@4", "R@8", "mAP", "dim", "train", "s", "loss"]
    assert table.count("\n") == 3
    for row in results["rows"]:
        assert 0 < row["map"] <= 1 and row["recall@1"] <= row["recall@2"] <= row["recall@4"] <= row["recall@8"] <= 1
    model, meta = load_checkpoint(out / "model.safetensors", expect="embedding_model")
    assert model.config.cgd_config == "SG" and model.config.last_stride == 1 and model.embedding_dim == 16
    assert model.pool.auxiliary is None and meta.embedding_space.startswith("cgd-")
    assert read_header(out / "model_M.safetensors")["config"]["cgd_config"] == "M"
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"][1]["recall@1"] == results["rows"][1]["recall@1"]
    assert not results["rows"][1]["resumed"]
    rerun: list[str] = []  # the same command again: every row comes back from its checkpoint
    assert cgd.run_cgd(cfg, progress=False, log=rerun.append)["rows"][1]["recall@1"] == results["rows"][1]["recall@1"]
    assert rerun[-2].split("\n")[2].split()[-2] == "resumed"
    # the saved model embeds exactly as evaluated
    again = cgd.evaluate(model, cgd.load_data(cfg).eval, cfg.eval, progress=False)
    assert again["map"] == pytest.approx(results["rows"][1]["map"], abs=1e-6)


def test_a_resumed_run_ends_with_the_same_weights(tmp_path, interrupt_at):
    whole = tiny_config(tmp_path / "a", train=cgd.CGDTrainConfig(epochs=2, lr=1e-3))
    data = cgd.load_data(whole).train
    reference, _ = cgd.train_cgd(whole, "SG", data, progress=False, log=None)
    cut = replace(whole, out=str(tmp_path / "b" / "run"))
    restore = interrupt_at(cgd, "cgd_losses", 3)  # epoch 2's first step (2 steps per epoch): the process dies
    with pytest.raises(KeyboardInterrupt):
        cgd.train_cgd(cut, "SG", data, progress=False, log=None)
    restore()
    resumed, _ = cgd.train_cgd(cut, "SG", data, progress=False, log=None)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_bad_data_is_a_one_line_error_before_training(tmp_path):
    one_class = tmp_path / "one"
    (one_class / "cat").mkdir(parents=True)
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(one_class / "cat" / f"{i}.jpg")
    data = DataConfig(kind="folder", root=str(one_class), split="images", held_out=0.5)
    with pytest.raises(TrainingError, match="has 1 class"):
        cgd.run_cgd(tiny_config(tmp_path, data=data), progress=False, log=None)
    few = replace(tiny_config(tmp_path), sampler=cgd.SamplerConfig(p=2, k=5))  # 4 views per object
    with pytest.raises(TrainingError, match="fewer than K=5 images"):
        cgd.run_cgd(few, progress=False, log=None)
    assert not list(Path(few.out).glob("*.safetensors"))


def test_cli_trains_and_prints_the_table_or_one_line_errors(tmp_path):
    from sdk.cli import app

    runner = CliRunner()
    cfg = tiny_config(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    r = runner.invoke(app, ["train", "cgd", "-c", str(tmp_path / "c.json"), "--no-progress",
                            "--set", "eval.baseline=false", "--descriptors", "G", "--dim", "16"])
    assert r.exit_code == 0, r.output
    assert "CGD G" in r.output and "R@8" in r.output and "pretrained + GeM" not in r.output
    bad = runner.invoke(app, ["train", "cgd", "-c", str(tmp_path / "c.json"), "--descriptors", "SMG", "--dim", "16"])
    assert bad.exit_code != 0 and "total dim 16 is not divisible by the 3 branches" in bad.output
    assert "Traceback" not in bad.output and bad.output.strip().count("\n") == 0
    missing = runner.invoke(app, ["train", "cgd", "--images", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "is not a folder" in missing.output


def test_a_cgd_model_is_the_quickstarts_gallery(tmp_path):
    from training.quickstart import QuickstartConfig, run_quickstart
    from training.compatible import CompatConfig

    cfg = tiny_config(tmp_path, eval=cgd.CGDEvalConfig(baseline=False))
    cgd.run_cgd(cfg, progress=False, log=None)
    gallery_file = Path(cfg.out) / "model.safetensors"
    space = read_header(gallery_file)["meta"].embedding_space
    lines: list[str] = []
    qs = QuickstartConfig(out=tmp_path / "qs", gallery=gallery_file, query_backbone="mobilenetv2_100",
                          image_size=32, n_objects=6, n_views=3, held_out=0.5, photos=False,
                          compat=CompatConfig(views=1, photo_views=0), progress=False)
    results = run_quickstart(qs, log=lines.append)
    assert results["embedding_space"] == space and "as trained" in lines[1]
    assert any(line.startswith("compatibility fine-tune: closed-form FC fit on") for line in lines)  # no epochs
    assert results["compat"]["epoch_losses"] == [] and results["compat"]["pairs"] > 0
    query, meta = load_checkpoint(tmp_path / "qs" / "query.safetensors")
    assert query.embedding_dim == 16 and meta.embedding_space == space


def test_a_cgd_model_exports_to_onnx_matching_torch(tmp_path):
    import numpy as np

    from export.bundle import export_bundle
    from sdk.backends import onnx_session as session

    cfg = tiny_config(tmp_path, eval=cgd.CGDEvalConfig(baseline=False))
    cgd.run_cgd(cfg, progress=False, log=None)
    manifest = export_bundle(Path(cfg.out) / "model.safetensors", tmp_path / "bundle")
    parity = manifest.extra["export"]["parity"]["query.onnx"]
    assert parity["images"] > 0 and parity["max_abs_diff"] <= 1e-4, parity
    model, _ = load_checkpoint(Path(cfg.out) / "model.safetensors")
    x = np.random.default_rng(1).normal(size=(3, 3, 40, 48)).astype(np.float32)  # another size than traced
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = session(tmp_path / "bundle" / "query.onnx").run(None, {"image": x})[0]
    assert got.shape == (3, 16) and np.abs(got - ref).max() <= 1e-4


def test_a_row_trained_by_another_command_is_resumed_not_redone(tmp_path):
    alone = tiny_config(tmp_path, model=replace(tiny_config(tmp_path).model, descriptors="M"))
    data = cgd.load_data(alone).train
    first, _ = cgd.train_cgd(alone, "M", data, progress=False, log=None)
    lines: list[str] = []
    table_run = tiny_config(tmp_path, ablations=("M",), eval=cgd.CGDEvalConfig(ks=(1, 5)))  # main SG, row M
    again, _ = cgd.train_cgd(table_run, "M", data, progress=False, log=lines.append)
    assert any("resuming" in line for line in lines) and not any("epoch 1/2:" in line for line in lines)
    for key, value in first.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, msg=key)
    changed = replace(table_run, loss=cgd.CGDLossConfig(margin=0.3))  # another training: refused, not mixed up
    with pytest.raises(TrainingError, match="checkpoint of another run"):
        cgd.train_cgd(changed, "M", data, progress=False, log=None)
