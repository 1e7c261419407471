"""`retrieval-sdk index build|add|info|compact|search`: batched gallery ingestion that resumes after
an interruption (kill -9) and skips unchanged files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.index import GalleryIndex

from .conftest import CLI, ROOT, SPACE

runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory, ukbench_dir):
    folder = tmp_path_factory.mktemp("gallery")
    for i, p in enumerate(sorted(ukbench_dir.glob("*.jpg"))[:40]):
        sub = folder / f"obj{i // 4:02d}"
        sub.mkdir(exist_ok=True)
        shutil.copy(p, sub / p.name)
    (folder / ".hidden.jpg").write_bytes(b"ignored")
    return folder


def test_build_add_info_compact_search(tiny_bundle, images, tmp_path):
    gallery = tmp_path / "g"
    shutil.copytree(images, gallery)
    (gallery / "broken.jpg").write_bytes(b"not an image")
    index = tmp_path / "index"
    r = runner.invoke(app, ["index", "build", str(tiny_bundle), str(gallery), "--index", str(index),
                            "--config", "HNSW16", "--batch-size", "8", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "40 added" in r.stdout and "1 unreadable" in r.stdout and "broken.jpg" in r.output
    with GalleryIndex.open(index, read_only=True) as idx:
        assert len(idx) == 40 and "obj00/ukbench00000.jpg" in idx
        assert idx.get("obj00/ukbench00000.jpg")["metadata"]["path"] == "obj00/ukbench00000.jpg"
        assert idx.thumbnail("obj00/ukbench00000.jpg")[1] == "image/jpeg"
        assert idx.space == SPACE and idx.stats().factory == "HNSW16"
    # add: new and changed files only
    shutil.copy(gallery / "obj00" / "ukbench00001.jpg", gallery / "obj00" / "copy.jpg")
    os.utime(gallery / "obj01" / "ukbench00004.jpg", ns=(1, 1))
    r = runner.invoke(app, ["index", "add", str(tiny_bundle), str(gallery), "--index", str(index), "--no-progress"])
    assert r.exit_code == 0 and "1 added, 1 updated, 39 already indexed" in r.stdout, r.output
    r = runner.invoke(app, ["index", "info", str(index)])
    info = json.loads(r.stdout)
    assert info["count"] == 41 and info["tombstones"] == 1 and info["embedding_space"] == SPACE
    r = runner.invoke(app, ["index", "compact", str(index)])
    assert r.exit_code == 0 and "dropped 1" in r.stdout
    r = runner.invoke(app, ["index", "search", str(tiny_bundle), str(gallery / "obj02" / "ukbench00008.jpg"),
                            "--index", str(index), "-k", "3"])
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 3
    # one-line errors
    r = runner.invoke(app, ["index", "add", str(tiny_bundle), str(gallery), "--index", str(tmp_path / "none")])
    assert r.exit_code == 2 and "index build" in r.output
    r = runner.invoke(app, ["index", "build", str(tiny_bundle), str(gallery), "--index", str(index), "--config", "Flat"])
    assert r.exit_code == 2 and "another --index path" in r.output
    r = runner.invoke(app, ["index", "build", str(tmp_path), str(gallery), "--index", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not a model bundle" in r.output


@pytest.mark.slow
def test_build_resumes_after_kill_9(tiny_bundle, images, tmp_path):
    index = tmp_path / "index"
    cmd = [*CLI, "index", "build", str(tiny_bundle), str(images), "--index", str(index), "--batch-size", "2",
           "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = index / "index.sqlite"
    deadline = time.time() + 120
    done = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
                    done = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
                    con.close()
                except sqlite3.Error:
                    pass
                if done >= 6:
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    assert done >= 6, "the build finished before it could be interrupted"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "already indexed" in r.stderr
    with GalleryIndex.open(index, read_only=True) as idx:
        assert len(idx) == 40 and idx.stats().tombstones == 0  # nothing embedded twice
