"""`retrieval-sdk export` and `retrieval-sdk verify` end to end through the CLI (typer's CliRunner, in
process), and the one-line errors for bad input."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from sdk.cli import app

from .conftest import make_checkpoint, rename_backbone

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, ckpts, real_photos):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    result = invoke("export", ckpts["query"], "--format", "onnx", "--format", "tflite", "--precision", "fp32",
                    "--gallery", ckpts["gallery"], "--calibration", real_photos / "ukbench-56", "--out", out,
                    "--no-progress", "--no-tflite-metadata")
    return out, result


def test_export_prints_the_bundle_table(cli_bundle):
    out, result = cli_bundle
    assert result.exit_code == 0, result.output
    for name in ("query.onnx", "query.tflite", "gallery.onnx"):
        assert name in result.output and (out / name).is_file()
    assert "parity vs torch" in result.output and "max abs diff" in result.output
    assert "retrieval-sdk verify" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["path"] for f in manifest["models"]["query"]["files"]} == {"query.onnx", "query.tflite"}


def test_verify_passes_and_writes_json(cli_bundle, real_photos, tmp_path):
    out, _ = cli_bundle
    result = invoke("verify", out, "--images", real_photos / "phototourism-13", "--runs", "2",
                    "--no-tflite-support", "--no-progress", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "query.onnx" in result.output and "ONNX at other input sizes" in result.output
    assert "checks passed" in result.output and "FAIL" not in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["checks"] and all(c["passed"] for c in report["checks"])


def test_verify_fails_on_a_tampered_bundle(cli_bundle, tmp_path):
    import shutil

    out, _ = cli_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    (copy / "query.onnx").write_bytes(b"not a model")
    result = invoke("verify", copy, "--no-progress")
    assert result.exit_code == 2 and "sha256" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args,message", [
    (["--precision", "int8"], "pass --calibration DIR"),
    (["--format", "pdf"], "unknown format 'pdf'"),
    (["--precision", "int4"], "unknown precision 'int4'"),
    (["--calibration", "/no/such/folder"], "is not a folder"),
])
def test_bad_options_give_one_line(tmp_path, ckpts, args, message):
    result = invoke("export", ckpts["query"], "--out", tmp_path / "o", "--no-progress", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_empty_calibration_folder(tmp_path, ckpts):
    (tmp_path / "cal").mkdir()
    result = invoke("export", ckpts["query"], "--out", tmp_path / "o", "--precision", "int8", "--calibration",
                    tmp_path / "cal", "--no-progress")
    assert result.exit_code == 2 and "has no images" in result.output


def test_unknown_architecture_checkpoint(tmp_path):
    path = make_checkpoint(tmp_path / "m.safetensors")
    rename_backbone(path, "mystery_net_9000")
    result = invoke("export", path, "--out", tmp_path / "o", "--no-progress")
    assert result.exit_code == 2 and "mystery_net_9000" in result.output and "cannot build" in result.output
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    result = invoke("export", tmp_path / "junk.pt", "--out", tmp_path / "o", "--no-progress")
    assert result.exit_code == 2 and "cannot read retrieval-sdk checkpoint" in result.output


def test_missing_coremltools_names_the_extra(tmp_path, ckpts, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)
    result = invoke("export", ckpts["query"], "--out", tmp_path / "o", "--format", "coreml", "--no-progress")
    assert result.exit_code == 2
    assert "pip install 'retrieval-sdk[export]'" in result.output and "coremltools" in result.output



def test_latency_benchmark_bad_input_is_one_line(tmp_path, bundle):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "export_latency.py"
    for args, message in (([str(tmp_path / "no-bundle")], "is not a model bundle"),
                          ([str(bundle), "--images", str(tmp_path / "no-photos")], "does not exist or is not a folder")):
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr and message in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_query_backbones_benchmark_prints_a_ratio_per_candidate():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "query_backbones.py"
    proc = subprocess.run([sys.executable, str(script), "--size", "64", "--rounds", "1", "--calls", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"mobilenetv2_100@64", "efficientnet_lite0@64", "efficientnet_lite1@64", "efficientnet_lite2@64",
                         "efficientnet_lite2@58", "efficientnet_lite2@54", "efficientnet_lite2@51"}
    assert float(rows["efficientnet_lite2@64"][-1]) == 1.0  # the gallery against itself
    assert all(float(r[-1]) > 0 and float(r[1].rstrip("M")) > 1 for r in rows.values())
