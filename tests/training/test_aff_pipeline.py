"""`retrieval-sdk train aff` end to end on tiny data: outputs in one space, caches reused, bad input
refused with a clear message; and the full-size config (ResNet-101 extractors, GLDv2 CSV) for one step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdk.cli import app
from training.aff.config import load_config
from training.aff.features import FeatureSet, LabelError, open_cache
from training.aff.gallery import load_gallery
from training.aff.train import embed_features, load_splits, run_aff
from training.models import load_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = [
    "data.n_objects=6", "data.n_views=4", "data.image_size=48", "data.split=images", "data.held_out=0.5",
    "extractors.0.backbone=tiny_resnet", "extractors.1.backbone=tiny_efficientnet",
    "extractors.2.backbone=tiny_resnet", "extractors.2.pretrained=false",
    *[f"extractors.{i}.train.{k}" for i in range(3) for k in ("epochs=1", "batch_size=8")],
    "train.epochs=1", "train.mixer_epochs=1", "train.batch_size=8", "baseline.epochs=1",
    "embedding_dim=32", "mixer.dim=32", "mixer.depth=1", "query.image_size=64", "extract_batch_size=16",
]


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_train_aff_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = ["train", "aff", "--config", str(CONFIGS / "aff_small_instances.json"), "--out", str(out), "--no-progress",
            *[a for o in TINY for a in ("--set", o)]]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    text = result.output
    for row in ("delg (tiny_resnet", "dolg (tiny_efficientnet", "cvnet (tiny_resnet", "ensemble", "concat+MLP",
                "AFF mixer [momentum classifier]", "-> mixer gallery", "asym / sym", "ablation: shared classifier",
                "mixer mAP", "momentum classifier asym mAP", "wall time"):
        assert row in text, row

    report = json.loads((out / "results.json").read_text())
    assert set(report["variants"]) == {"main", "shared"}
    assert all(0.0 <= r["map"] <= 1.0 for r in report["rows"])
    space = report["embedding_space"]
    query, meta = load_checkpoint(out / "query.safetensors")
    assert meta.embedding_space == space and meta.role == "query" and query.embedding_dim == 32
    gallery = load_gallery(out / "gallery.safetensors")
    assert gallery.embedding_space == space and gallery.embedding_dim == 32

    # the saved gallery side reproduces, from images, the embeddings evaluated from the cached features
    cfg = load_config(CONFIGS / "aff_small_instances.json", [*TINY, f"out={json.dumps(str(out))}"])
    splits = load_splits(cfg)
    caches = [open_cache(out / "features" / "eval" / e.name) for e in cfg.extractors]
    cached = embed_features(gallery.mixer, FeatureSet(caches, splits.eval.labels).load())
    direct = gallery.embed_images(splits.eval.paths, batch_size=5)
    assert np.allclose(cached, direct, atol=1e-4)
    assert np.allclose(np.linalg.norm(direct, axis=1), 1, atol=1e-5) and direct.dtype == np.float32

    # a re-run reuses the trained extractors and the feature caches
    again = cli(*args, "--set", "ablations=[]")
    assert again.exit_code == 0, again.output
    assert again.output.count("trained extractor reused") == 3 and again.output.count("cached features") == 6

    # other data into the same caches: a clear error, not silently wrong features
    other = cli(*args, "--set", "ablations=[]", "--set", "data.n_views=5", "--set", "extractors.0.train.epochs=0",
                "--set", "extractors.1.train.epochs=0", "--set", "extractors.2.train.epochs=0")
    assert other.exit_code == 2
    assert "extracted from another dataset" in other.output and "--overwrite-cache" in other.output


STUDIES = ['fusion_variants=["concat_mlp", "laff", "orthogonal"]', "leave_one_out=true", "robustness.noise_dim=16",
           'robustness.noise_draws=["fixed", "redrawn"]',
           'robustness.extractors=[{"kind": "rmac", "name": "rmac", "backbone": "tiny_resnet", "dim": 16, '
           '"train": {"epochs": 0}}, {"kind": "cvnet", "name": "gem", "backbone": "tiny_resnet", "dim": 16, '
           '"scales": [1.0], "train": {"epochs": 0}}]', "ablations=[]"]


@pytest.mark.slow
def test_studies_print_one_table_each(tmp_path):
    """Fusion variants with their query models, robustness to weak / noise features, leave-one-feature-out."""
    cfg = load_config(CONFIGS / "aff_small_instances.json", [*TINY, *STUDIES, f"out={json.dumps(str(tmp_path))}"])
    lines: list[str] = []
    report = run_aff(cfg, progress=False, log=lines.append)
    text = "\n".join(lines)
    for row in ("fusion variants", "dynamic mixer (AFF)", "laff", "orthogonal", "robustness to noisy gallery features",
                "clean (delg, dolg, cvnet)", "+ 2 weak (rmac, gem)", "+ gaussian noise 16-d", "+ gaussian noise 16-d (redrawn)",
                "leave-one-feature-out",
                "without delg", "without cvnet", "the ensemble loses more than the mixer", "every feature helps"):
        assert row in text, row
    assert set(report["fusions"]) == {"concat_mlp", "laff", "orthogonal"}
    for v in report["fusions"].values():
        assert 0 <= v["asym"]["map"] <= 1 and v["ratio"] == pytest.approx(v["asym"]["map"] / v["mixer"]["map"])
    rob = report["robustness"]
    assert [r["features"] for r in rob] == [["delg", "dolg", "cvnet"], ["delg", "dolg", "cvnet", "rmac", "gem"],
                                            ["delg", "dolg", "cvnet", "noise"], ["delg", "dolg", "cvnet", "noise"]]
    ens = [r for r in report["rows"] if r["kind"] == "ensemble"][0]
    assert rob[0]["ensemble"]["map"] == pytest.approx(ens["map"])  # the clean row is the main table's ensemble
    assert [r["features"] for r in report["leave_one_out"][1:]] == [["dolg", "cvnet"], ["delg", "cvnet"], ["delg", "dolg"]]
    drop = rob[0]["ensemble"]["map"] - rob[2]["ensemble"]["map"]
    assert report["checks"]["robust_to gaussian noise 16-d"]["ensemble_drop"] == pytest.approx(drop)
    assert rob[3]["ensemble"] == rob[2]["ensemble"]  # the same cached noise is evaluated; only training differs
    assert "robust_to gaussian noise 16-d (redrawn)" in report["checks"]
    assert {"mixer_beats_laff", "mixer_beats_orthogonal", "every_feature_helps"} <= set(report["checks"])
    assert not (tmp_path / "checkpoints").exists()


def _fake_gldv2(root: Path, landmarks: int = 4, per: int = 4, missing_label: bool = False) -> Path:
    rng = np.random.default_rng(0)
    rows = ["id,url,landmark_id"]
    for lm in range(landmarks):
        colour = rng.integers(0, 255, 3)
        for j in range(per):
            image_id = f"{lm:x}{j:x}{rng.integers(0, 16 ** 14):014x}"
            path = root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(colour + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
            label = "" if missing_label and lm == 1 and j == 0 else str(100 + lm)
            rows.append(f"{image_id},http://x,{label}")
    csv = root / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def _full(tmp_path: Path, csv: Path, size: int = 64) -> list[str]:
    steps = [f"extractors.{i}.{k}" for i in range(3)
             for k in ("pretrained=false", f"image_size={size}", "train.epochs=1", "train.max_steps=1",
                       "train.batch_size=2")]
    return [f"data.csv={json.dumps(str(csv))}", f"data.root={json.dumps(str(tmp_path / 'train'))}",
            "data.held_out=0.5", "data.eval_limit=null", f"out={json.dumps(str(tmp_path / 'out'))}", *steps,
            "train.epochs=1", "train.mixer_epochs=1", "train.max_steps=1", "train.batch_size=2", "baseline.epochs=1",
            f"query.image_size={size}", "query.pretrained=false", "ablations=[]", "extract_batch_size=4"]


@pytest.mark.slow
def test_full_config_runs_one_training_step(tmp_path):
    """configs/aff_full.json as shipped (ResNet-101 DELG/DOLG/CVNet, GLDv2 CSV, MobileNetV2 query, 2048-d
    space), on a 16-image stand-in for GLDv2 with images at 64 px, one step of every training loop."""
    csv = _fake_gldv2(tmp_path)
    cfg = load_config(CONFIGS / "aff_full.json", _full(tmp_path, csv))
    logs: list[str] = []
    torch.manual_seed(0)
    report = run_aff(cfg, progress=False, log=logs.append)
    text = "\n".join(logs)
    assert "DELG on resnet101" in text and "DOLG on resnet101" in text and "CVNET on resnet101" in text
    assert "GLDv2" in report["data"] and report["variants"]["main"]["asym"]["map"] >= 0
    _, meta = load_checkpoint(tmp_path / "out" / "query.safetensors")
    assert meta.embedding_space == report["embedding_space"]


def test_missing_landmark_label_is_refused(tmp_path):
    csv = _fake_gldv2(tmp_path, landmarks=3, per=3, missing_label=True)
    cfg = load_config(CONFIGS / "aff_full.json", _full(tmp_path, csv))
    with pytest.raises(LabelError, match="rows without a landmark_id"):
        load_splits(cfg)


def test_cli_bad_input_is_one_line(tmp_path):
    """A missing class label and an unknown config key stop the command with one 'error:' line, exit code 2."""
    csv = _fake_gldv2(tmp_path, landmarks=3, per=3, missing_label=True)
    args = ["train", "aff", "--config", str(CONFIGS / "aff_full.json"), "--no-progress",
            *[a for o in _full(tmp_path, csv) for a in ("--set", o)]]
    for extra, match in ((), "rows without a landmark_id"), (("--set", "train.epoch=1"), "unknown key 'epoch'"):
        result = cli(*args, *extra)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith("error: ") and match in lines[0]


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_figures(tmp_path, interrupt_at):
    """A run stopped inside the joint stage continues from OUT/checkpoints and ends with the figures of an
    uninterrupted run; the finished run removes its checkpoints."""
    from training.aff.query import QueryClassifier

    tiny = [*TINY, "ablations=[]", "train.epochs=2"]

    def run(out: Path, logs: list[str] | None = None) -> dict:
        cfg = load_config(CONFIGS / "aff_small_instances.json", [*tiny, f"out={json.dumps(str(out))}"])
        return run_aff(cfg, progress=False, log=(logs if logs is not None else []).append)

    straight = run(tmp_path / "straight")
    assert not (tmp_path / "straight" / "checkpoints").exists()

    restore = interrupt_at(QueryClassifier, "update", 2)  # the joint stage's second step
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    restore()
    assert list((tmp_path / "resumed" / "checkpoints").glob("joint-*/last.pt"))
    logs: list[str] = []
    resumed = run(tmp_path / "resumed", logs)
    assert any("joint: resuming from" in line and "at step 1" in line for line in logs), logs
    assert sum("trained extractor reused" in line for line in logs) == 3
    for key in ("mixer", "asym"):
        assert resumed["variants"]["main"][key] == straight["variants"]["main"][key]
    assert not (tmp_path / "resumed" / "checkpoints").exists()


def test_weak_extractors_have_no_released_checkpoints(tmp_path):
    from training.aff.train import prepare_extractor
    from training.errors import TrainingError
    from training.extractors import ExtractorConfig, ExtractorTrainConfig

    release = tmp_path / "rmac.pth"
    torch.save({"model_state": {}}, release)
    splits = load_splits(load_config(CONFIGS / "aff_small_instances.json", [*TINY, f"out={json.dumps(str(tmp_path))}"]))
    ec = ExtractorConfig("rmac", backbone="tiny_resnet", dim=8, weights=str(release), train=ExtractorTrainConfig(epochs=0))
    with pytest.raises(TrainingError, match="there are no released rmac checkpoints"):
        prepare_extractor(ec, splits.train, "fp", tmp_path, False, lambda _: None)
