"""The bundle: manifest contents and sha256, tamper detection, verify's report, bad input, and an export
that leaves the working directory clean."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from export.bundle import export_bundle, file_name, parse_choices
from export.errors import ExportError, MissingDependencyError
from sdk.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, BundleError, read_manifest, sha256_path

from .conftest import DIM, SPACE, make_checkpoint, rename_backbone

EXPECTED_QUERY_FILES = {f"query{p}{e}" for p in ("", ".fp16", ".int8") for e in (".onnx", ".tflite", ".mlpackage")}


def test_manifest_contents_and_sha256(bundle, ckpts):
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["format"] == BUNDLE_FORMAT and raw["format_version"] == BUNDLE_VERSION
    m = read_manifest(bundle, verify=True)
    assert m.embedding_space == SPACE and set(m.models) == {"query", "gallery"}
    q = m.model("query")
    assert q.embedding_dim == DIM and q.name == "tiny_resnet-gem" and q.dtype == "float32"
    assert q.source_checkpoint == str(ckpts["query"].resolve())
    assert q.preprocess.input_size == (64, 64) and len(q.preprocess.mean) == 3
    assert {f.path for f in q.files} == EXPECTED_QUERY_FILES
    for f in q.files + m.model("gallery").files:
        assert f.sha256 == sha256_path(bundle / f.path) and len(f.sha256) == 64
        assert f.path == file_name(m.models[[r for r in m.models if f in m.models[r].files][0]].role, f.format,
                                   f.precision)
        assert f.layout == {"onnx": "NCHW", "tflite": "NHWC", "coreml": "NCHW"}[f.format]
        assert f.batch == ("dynamic" if f.format == "onnx" else "1")
    assert [f.path for f in m.model("gallery").files] == ["gallery.onnx"]
    record = m.extra["export"]
    assert record["versions"]["torch"].startswith("2.13") and "onnxruntime" in record["versions"]
    for name, p in record["parity"].items():
        if name.endswith(".mlpackage") and ".fp16." not in name and ".int8." not in name:
            continue  # fp32 CoreML: structural check only off macOS
        assert p["images"] == 8 and p["min_cosine"] > 0.98, (name, p)


def test_tampered_file_is_caught(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "query.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "query.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        read_manifest(copy, verify=True)
    shutil.copy(bundle / "query.int8.onnx", copy / "query.int8.onnx")
    read_manifest(copy, verify=True)
    (copy / "query.tflite").unlink()
    with pytest.raises(BundleError, match="missing"):
        read_manifest(copy, verify=True)


def test_verify_report_on_real_photos(bundle, real_photos):
    from export.verify import format_report, verify_bundle

    report = verify_bundle(bundle, [real_photos / "ukbench-56", real_photos / "phototourism-13"], runs=2,
                           tflite_support=False, progress=False)
    rows = {r.path: r for r in report.files}
    assert {"(torch eager)", "query.onnx", "query.int8.tflite", "query.mlpackage", "gallery.onnx"} <= set(rows)
    assert rows["query.onnx"].max_abs_diff <= 1e-4 and rows["query.tflite"].max_abs_diff <= 1e-4
    assert rows["query.int8.onnx"].min_cos_fp32 >= 0.99
    assert 0 < rows["query.int8.onnx"].size_ratio < 0.6 and rows["query.onnx"].ms > 0
    assert set(rows["query.onnx"].maps) == {"ukbench-56", "phototourism-13"}
    # a bundle with a gallery model: query files are also ranked against it (printed, not checked)
    assert set(rows["query.int8.onnx"].asym_maps) == {"ukbench-56", "phototourism-13"}
    assert not rows["gallery.onnx"].asym_maps and not any("asymmetric" in c.name for c in report.checks)
    assert {s.size for s in report.sizes if s.path == "query.onnx"} >= {(64, 64), (48, 48), (80, 64)}
    assert all(s.max_abs_diff <= 1e-4 for s in report.sizes if s.path in ("query.onnx", "gallery.onnx"))
    names = {c.name: c.passed for c in report.checks}
    assert names["manifest: every file present, sha256 matches"]
    assert names["query.onnx: max abs diff to torch <= 0.0001"] and names["query.tflite: max abs diff to torch <= 0.0001"]
    text = format_report(report)
    assert "ONNX at other input sizes" in text and "checks:" in text and "[PASS]" in text
    assert "asymmetric mAP: query file against the gallery model's embeddings" in text


def test_export_leaves_the_working_directory_clean(tmp_path, ckpts, real_photos, monkeypatch):
    """onnxruntime's symbolic shape inference gives up on the GeM graph and, before raising, saves
    sym_shape_infer_temp.onnx + <uuid1>.data into the current directory; export must contain that."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    export_bundle(ckpts["query"], tmp_path / "out", formats=("onnx", "tflite"), precisions=("fp32", "fp16", "int8"),
                  calibration=real_photos / "phototourism-13", tflite_metadata=False)
    assert sorted(os.listdir(work)) == []
    assert os.getcwd() == str(work)


def test_choices_are_parsed_and_validated():
    assert parse_choices(["onnx,tflite"], ("onnx", "tflite", "coreml"), "format") == ("onnx", "tflite")
    assert parse_choices("all", ("onnx", "tflite", "coreml"), "format", all_means=("onnx", "tflite", "coreml")) == \
        ("onnx", "tflite", "coreml")
    with pytest.raises(ExportError, match="unknown format 'pdf'"):
        parse_choices("pdf", ("onnx",), "format")


def test_int8_without_calibration_names_the_flag(tmp_path, ckpts):
    with pytest.raises(ExportError, match="--calibration DIR"):
        export_bundle(ckpts["query"], tmp_path / "o", precisions="int8")


def test_empty_calibration_folder(tmp_path, ckpts):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    with pytest.raises(ExportError, match="has no images.*put photos"):
        export_bundle(ckpts["query"], tmp_path / "o", precisions="int8", calibration=tmp_path / "empty")


def test_checkpoint_of_unknown_architecture(tmp_path):
    path = make_checkpoint(tmp_path / "m.safetensors")
    rename_backbone(path, "mystery_net_9000")
    with pytest.raises(ValueError, match="cannot build.*mystery_net_9000"):
        export_bundle(path, tmp_path / "o")


def test_query_and_gallery_from_different_spaces(tmp_path, ckpts):
    other = make_checkpoint(tmp_path / "g.pt", role="gallery", space="another-space")
    with pytest.raises(ExportError, match="different embedding spaces"):
        export_bundle(ckpts["query"], tmp_path / "o", gallery_checkpoint=other)


def test_missing_optional_extra_names_the_install(tmp_path, ckpts, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import coremltools -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'retrieval-sdk\[export\]'.*coremltools"):
        export_bundle(ckpts["query"], tmp_path / "o", formats="coreml")
    assert not (tmp_path / "o").exists()  # fails before any slow conversion or output
