"""`train distill` end to end on tiny models: the run, its table and files, exact resume, the teacher's
space inherited in asymmetric mode, and one-line errors for bad teachers and image folders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import training.distill as distill
from training.aff.config import DataConfig
from training.config import ConfigError
from training.checkpoint import CheckpointMeta, load_checkpoint, read_header, save_checkpoint
from training.data import DatasetError
from training.models import EmbeddingModel, ModelConfig
from training.rank_distill import RankDistillConfig
from training.teacher import TeacherError

SPACE = "space-teacher0001"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = EmbeddingModel(ModelConfig("tiny_resnet", "gem", embedding_dim=16, input_size=32))
    return save_checkpoint(model, tmp_path_factory.mktemp("teacher") / "teacher.safetensors",
                           CheckpointMeta(embedding_space=SPACE, role="gallery"))


def tiny_config(tmp_path: Path, teacher: Path, **changes) -> distill.DistillConfig:
    cfg = distill.DistillConfig(
        out=str(tmp_path / "run"), teacher=str(teacher), teacher_cache=str(tmp_path / "cache"),
        data=DataConfig(kind="instances", split="classes", n_objects=8, n_views=4, image_size=32, held_out=0.5,
                        train_limit=None, eval_limit=None),
        student=distill.StudentConfig("tiny_efficientnet", pretrained=False, image_size=32),
        loss=RankDistillConfig(mix_iterations=2, cross_weight=1.0, pull_weight=1.0),
        eval=distill.EvalConfig(scales=(1.0, 0.7071), whiten=True), batch_size=8, epochs=2, lr=1e-3,
        average_epochs=(1, 2))
    return replace(cfg, **changes)


def test_a_run_writes_a_student_in_the_teachers_space_and_prints_one_table(tmp_path, teacher_file):
    lines: list[str] = []
    cfg = tiny_config(tmp_path, teacher_file, ablations=("symmetric",))
    results = distill.run_distill(cfg, progress=False, log=lines.append)
    out = Path(cfg.out)
    assert [r["run"] for r in results["rows"]] == ["main", "symmetric"]
    assert results["teacher_calls"] == 32 and results["n_train"] == 16  # 16 training + 16 evaluation images
    main, sym = results["rows"]
    assert 0 < main["student_map"] <= 1 and 0 < main["asymmetric_map"] <= 1 and "asymmetric_map" not in sym
    assert main["ratio"] == pytest.approx(main["student_map"] / results["teacher_map"])
    table = lines[-1]
    assert "teacher symmetric mAP" in table and "asym mAP" in table and table.count("\n") == 3
    student, meta = load_checkpoint(out / "student.safetensors")
    assert meta.embedding_space == SPACE and student.embedding_dim == 16  # asymmetric: the teacher's space
    assert read_header(out / "student_symmetric.safetensors")["meta"].embedding_space == ""
    assert json.loads((out / "results.json").read_text())["rows"][0]["run"] == "main"
    # a second run costs no teacher call: every image comes from the cache
    again = distill.run_distill(replace(cfg, out=str(tmp_path / "run2"), ablations=()), progress=False, log=lines.append)
    assert again["teacher_calls"] == 0


def test_weights_are_the_average_of_the_chosen_epochs(tmp_path, teacher_file):
    cfg = tiny_config(tmp_path, teacher_file)
    data = distill.load_distill_data(cfg)
    targets = np.random.default_rng(0).normal(size=(len(data.train), 16)).astype(np.float32)
    student, _ = distill.train_student(cfg, data.train, targets, 16, progress=False, log=None)
    run_dir = Path(cfg.out) / "runs" / cfg.name
    states = [load_checkpoint(run_dir / f"epoch{e}.safetensors")[0].state_dict() for e in (1, 2)]
    key = "whiten.fc.weight"
    assert not torch.equal(states[0][key], states[1][key])
    torch.testing.assert_close(student.state_dict()[key], (states[0][key] + states[1][key]) / 2)


def test_procedural_objects_join_d_and_never_repeat_the_evaluation_objects(tmp_path, teacher_file):
    """`procedural` adds new objects (their own seed) to D; the evaluation set is untouched."""
    base = distill.load_distill_data(tiny_config(tmp_path / "a", teacher_file))
    cfg = tiny_config(tmp_path / "b", teacher_file, procedural=distill.ProceduralConfig(3, 2, 32, seed=5))
    data = distill.load_distill_data(cfg)
    extra = data.train[len(base.train):]
    assert len(extra) == 6 and all("seed5" in str(p) for p in extra)
    assert [p.read_bytes() for p in data.train[:len(base.train)]] == [p.read_bytes() for p in base.train]
    assert len(data.eval) == len(base.eval)
    with pytest.raises(ConfigError, match="procedural.seed 0 equals data.seed"):
        tiny_config(tmp_path, teacher_file, procedural=distill.ProceduralConfig(3, 2, 32, seed=0))
    only = replace(cfg, data=None, out=str(tmp_path / "c"))  # procedural objects alone are a D
    assert len(distill.load_distill_data(only).train) == 6


def test_a_resumed_run_ends_with_the_same_weights(tmp_path, teacher_file, interrupt_at):
    whole = tiny_config(tmp_path / "a", teacher_file, epochs=3, average_epochs=(3,))
    data = distill.load_distill_data(whole)
    targets = np.random.default_rng(1).normal(size=(len(data.train), 16)).astype(np.float32)
    reference, _ = distill.train_student(whole, data.train, targets, 16, progress=False, log=None)

    cut = replace(whole, out=str(tmp_path / "b" / "run"))
    restore = interrupt_at(distill, "distill_loss", 5)  # epoch 3's first step (2 steps per epoch): the process dies
    with pytest.raises(KeyboardInterrupt):
        distill.train_student(cut, data.train, targets, 16, progress=False, log=None)
    restore()
    resumed, _ = distill.train_student(cut, data.train, targets, 16, progress=False, log=None)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_bad_teachers_and_folders_are_one_line_errors(tmp_path, teacher_file):
    with pytest.raises(TeacherError, match="not found: pass a .safetensors checkpoint, a bundle folder or a serve URL"):
        distill.run_distill(tiny_config(tmp_path, tmp_path / "nope.safetensors"), progress=False, log=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="folder without manifest.json"):
        distill.run_distill(tiny_config(tmp_path, tmp_path / "empty"), progress=False, log=None)
    bad_dim = tiny_config(tmp_path, teacher_file, student=distill.StudentConfig("tiny_efficientnet", False, 32, dim=8))
    with pytest.raises(TeacherError, match="dim must be the teacher's 16, got student.dim=8"):
        distill.run_distill(bad_dim, progress=False, log=None)
    with pytest.raises(TeacherError, match="needs 32 teacher calls.*budget is 10"):
        distill.run_distill(tiny_config(tmp_path, teacher_file, teacher_budget=10), progress=False, log=None)
    assert not list((tmp_path / "cache").rglob("*.npy"))  # the refused run sent and cached nothing
    with pytest.raises(DatasetError, match="no images in"):
        distill.run_distill(tiny_config(tmp_path, teacher_file, data=None, images=str(tmp_path / "empty")),
                            progress=False, log=None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DatasetError, match="none of the 1 files in .* is a readable image"):
        distill.run_distill(tiny_config(tmp_path, teacher_file, data=None, images=str(broken)), progress=False, log=None)
    with pytest.raises(ConfigError, match="unknown ablation 'nope'"):
        tiny_config(tmp_path, teacher_file, ablations=("nope",))


def test_cli_errors_are_one_line(tmp_path, teacher_file):
    from sdk.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "distill", "--teacher", str(tmp_path / "missing.safetensors"),
                                 "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code != 0 and "teacher" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(app, ["train", "distill", "--teacher", str(teacher_file), "--mode", "sideways"])
    assert result.exit_code != 0 and "--mode must be symmetric or asymmetric" in result.output
    result = runner.invoke(app, ["train", "distill", "--teacher", str(teacher_file), "--images", str(tmp_path),
                                 "--set", "loss.tau=2"])
    assert result.exit_code != 0 and "loss.tau must be in (-1, 1)" in result.output and "Traceback" not in result.output
