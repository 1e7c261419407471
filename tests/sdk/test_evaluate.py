"""`retrieval-sdk evaluate` as a user runs it: its figures against a direct computation with training's
evaluation (labelled leave-one-out on the real photos for every file of a bundle, query-gallery with a
CSV, revisited E/M/H with a gnd file and stand-in images, re-ranking), without torch, and bad input."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..test_package_boundaries import BLOCK_TORCH
from .conftest import CLI, ROOT, make_bundle

TOL = 1e-9


def evaluate(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "evaluate", *map(str, args), "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def name_labels(paths: list[Path]) -> np.ndarray:
    """UKBench: the group of four; PhotoTourism: the landmark before the numbers (written out here on purpose)."""
    return np.asarray([f"u{int(p.stem[7:]) // 4}" if p.stem.startswith("ukbench") else re.sub(r"(_\d+)+$", "", p.stem)
                       for p in paths])


def embed(bundle: Path, role: str, images, fmt: str = "onnx", precision: str | None = None) -> np.ndarray:
    from sdk.embedder import Embedder

    return Embedder.from_bundle(bundle, backend=fmt, role=role, precision=precision).embed(images)


def row(res: dict, path: str) -> dict:
    return next(f for f in res["files"] if f["path"] == path)


@pytest.mark.slow
def test_every_file_of_a_bundle_on_the_real_photos_matches_training_evaluation(bundle, real_photos, tmp_path):
    """Leave-one-out on UKBench + PhotoTourism (labels from file names): for every ONNX and TFLite file of
    the query model and for the gallery model, the command's asymmetric and symmetric mAP / Recall@k are
    training.evaluate.labelled_eval's on embeddings made here; CoreML is reported as not runnable on Linux."""
    from sdk.bundle import read_manifest
    from training.evaluate import labelled_eval

    out = tmp_path / "report"
    proc = evaluate(bundle, "--images", real_photos, "--labels", "names", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(out)
    paths = sorted(real_photos.rglob("*.jpg"))
    labels = name_labels(paths)
    assert res["queries"] == res["gallery"] == len(paths) == 69 and res["classes"] == 18
    assert res["protocol"] == "leave-one-out" and res["unreadable"] == []

    gallery = embed(bundle, "gallery", paths)
    sym = labelled_eval(gallery, labels, gallery, labels, ks=(1, 5, 10), exclude_self=True)
    assert abs(res["symmetric"]["map"] - sym.map) < TOL
    assert res["symmetric"]["recall"] == {str(k): v for k, v in sym.recall.items()}
    assert f"{sym.map * 100:.2f}" in proc.stdout

    manifest = read_manifest(bundle)
    files = manifest.model("query").files
    runnable = [f for f in files if f.format in ("onnx", "tflite")]
    assert {f.precision for f in runnable} == {"fp32", "fp16", "int8"} and {f.format for f in runnable} == {"onnx", "tflite"}
    for f in runnable:
        r = row(res, f.path)
        q = embed(bundle, "query", paths, f.format, f.precision)
        asym = labelled_eval(q, labels, gallery, labels, ks=(1, 5, 10), exclude_self=True)
        assert abs(r["asymmetric"]["map"] - asym.map) < TOL, f.path
        assert r["asymmetric"]["recall"] == {str(k): v for k, v in asym.recall.items()}, f.path
        assert abs(r["ratio"] - asym.map / sym.map) < TOL
        assert 0 <= r["asymmetric"]["mp_at_10"] <= 1 and r["images_per_s"] > 0
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f.path + " "))
        assert f"{asym.map * 100:.2f}" in line and f"{sym.map * 100:.2f}" in line, line
    ref = row(res, manifest.model("gallery").file("onnx").path)
    assert ref["gallery_reference"] and ref["model"] == "gallery" and abs(ref["asymmetric"]["map"] - sym.map) < TOL
    assert {s["path"] for s in res["skipped_files"]} == {f.path for f in files if f.format == "coreml"}
    assert all("macOS" in s["reason"] for s in res["skipped_files"])

    # A second run reads every embedding from the cache and prints the same figures.
    int8 = manifest.model("query").file("onnx", "int8").path
    again = evaluate(bundle, "--images", real_photos, "--labels", "names", "--out", out, "--only", "onnx/int8")
    assert again.returncode == 0, again.stderr[-2000:]
    res2 = results(out)
    assert [f["path"] for f in res2["files"]] == [int8, ref["path"]]
    assert all(f["cached"] for f in res2["files"])
    assert row(res2, int8)["asymmetric"] == row(res, int8)["asymmetric"]


def _stand_in_revisited(root: Path, rng: np.random.Generator) -> tuple[Path, dict]:
    """A revisited-style set: 6 landmarks x 5 database images (noise textures per landmark, varied) and 2
    queries per landmark (another view, with a box), gnd with easy / hard / junk lists."""
    jpg = root / "jpg"
    jpg.mkdir(parents=True)
    imlist, qimlist, gnd = [], [], []
    bases = [rng.integers(0, 256, (8, 8, 3)).astype(np.uint8) for _ in range(6)]

    def view(base, name, size=(96, 80)):
        noisy = np.clip(base.astype(int) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).resize(size, Image.BILINEAR).save(jpg / f"{name}.jpg", quality=90)

    for lm, base in enumerate(bases):
        for v in range(5):
            imlist.append(f"landmark{lm}_{v:03d}")
            view(base, imlist[-1])
    for lm, base in enumerate(bases):
        for v in range(2):
            qimlist.append(f"landmark{lm}_q{v}")
            view(base, qimlist[-1], (120, 100))
            ids = np.arange(lm * 5, lm * 5 + 5)
            gnd.append({"bbx": [10.0, 8.0, 110.0, 90.0], "easy": ids[:2].tolist(), "hard": ids[2:4].tolist(),
                        "junk": ids[4:].tolist()})
    gnd[-1] = {**gnd[-1], "easy": [], "hard": []}  # a query without positives: excluded, as revisitop does
    path = root / "gnd_standin.pkl"
    path.write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return path, {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


@pytest.mark.slow
def test_revisited_easy_medium_hard_equal_training_evaluate(tiny_bundle, tmp_path):
    from training.evaluate import load_gnd, ranks_from_scores, revisited_eval

    gnd_path, raw = _stand_in_revisited(tmp_path / "data", np.random.default_rng(0))
    out = tmp_path / "report"
    proc = evaluate(tiny_bundle, "--images", tmp_path / "data", "--gnd", gnd_path, "--out", out,
                    "--rerank", "aqe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(out)
    assert res["protocol"] == "revisited" and res["queries"] == 12 and res["gallery"] == 30

    gt = load_gnd(gnd_path)
    jpg = tmp_path / "data" / "jpg"
    crops = [Image.open(jpg / f"{n}.jpg").convert("RGB").crop((10, 8, 110, 90)) for n in raw["qimlist"]]
    db = [jpg / f"{n}.jpg" for n in raw["imlist"]]
    g = embed(tiny_bundle, "gallery", db)
    for role, got in (("query", row(res, "query.onnx")["asymmetric"]), ("gallery", res["symmetric"])):
        q = embed(tiny_bundle, role, crops)
        want = revisited_eval(ranks_from_scores(q @ g.T), gt)
        for d in ("easy", "medium", "hard"):
            assert abs(got[d]["map"] - getattr(want, d).map) < TOL, (role, d)
            assert np.allclose([got[d]["mp_at_k"][k] for k in ("1", "5", "10")], getattr(want, d).mp_at_k)
    m = res["symmetric"]["medium"]["map"]
    assert f"{m * 100:.2f}" in proc.stdout and "asym M" in proc.stdout
    assert {"easy", "medium", "hard", "ratio"} == set(row(res, "query.onnx")["rerank"]["aqe"])


@pytest.mark.slow
def test_query_gallery_with_csv_labels_and_unreadable_images(tiny_bundle, ukbench_dir, tmp_path):
    """Queries: view 0 of each UKBench object; gallery: views 1-3; labels from CSV files; two broken files
    are skipped, counted and named; the figures are labelled_eval's on the readable images."""
    from training.evaluate import labelled_eval

    photos = sorted(ukbench_dir.glob("*.jpg"))
    qdir, gdir = tmp_path / "q", tmp_path / "g"
    qdir.mkdir(), gdir.mkdir()
    for p in photos:
        shutil.copy(p, (qdir if int(p.stem[7:]) % 4 == 0 else gdir) / p.name)
    (gdir / "broken.jpg").write_bytes(b"not a jpeg")
    (qdir / "empty.jpg").write_bytes(b"")

    def write_csv(folder: Path) -> Path:
        rows = ["path,label"] + [f"{p.name},obj{int(p.stem[7:]) // 4 if p.stem[7:].isdigit() else 0}"
                                 for p in sorted(folder.glob("*.jpg"))]
        (folder.parent / f"{folder.name}.csv").write_text("\n".join(rows) + "\n")
        return folder.parent / f"{folder.name}.csv"

    out = tmp_path / "report"
    proc = evaluate(tiny_bundle, "--images", qdir, "--labels", write_csv(qdir), "--gallery", gdir,
                    "--gallery-labels", write_csv(gdir), "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(out)
    assert res["protocol"] == "query-gallery" and res["queries"] == 14 and res["gallery"] == 42
    assert sorted(u["image"] for u in res["unreadable"]) == ["broken.jpg", "empty.jpg"]
    assert "warning: skipped broken.jpg" in proc.stderr and "2 unreadable images skipped" in proc.stdout

    qs = sorted(qdir.glob("ukbench*.jpg"))
    gs = sorted(gdir.glob("ukbench*.jpg"))
    ql, gl = (np.asarray([f"obj{int(p.stem[7:]) // 4}" for p in ps]) for ps in (qs, gs))
    g = embed(tiny_bundle, "gallery", gs)
    want_sym = labelled_eval(embed(tiny_bundle, "gallery", qs), ql, g, gl)
    want_asym = labelled_eval(embed(tiny_bundle, "query", qs), ql, g, gl)
    assert abs(res["symmetric"]["map"] - want_sym.map) < TOL
    assert abs(row(res, "query.onnx")["asymmetric"]["map"] - want_asym.map) < TOL
    assert (out / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_rerank_figures_equal_sdk_rerank_scored_by_training_evaluate(tiny_bundle, ukbench_dir, tmp_path):
    from sdk.rerank import Diffusion, alpha_qe, aqe
    from training.evaluate import labelled_eval, labelled_eval_scores

    out = tmp_path / "report"
    proc = evaluate(tiny_bundle, "--images", ukbench_dir, "--out", out, "--rerank", "aqe,alpha-qe",
                    "--rerank", "diffusion")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(out)
    paths = sorted(ukbench_dir.glob("*.jpg"))
    labels = name_labels(paths)
    g = embed(tiny_bundle, "gallery", paths)
    for role, got in (("query", row(res, "query.onnx")["rerank"]), ("gallery", res["symmetric"]["rerank"])):
        q = g if role == "gallery" else embed(tiny_bundle, "query", paths)
        want = {
            "aqe": labelled_eval(aqe(q, g, k=2, exclude_self=True), labels, g, labels, exclude_self=True).map,
            "alpha-qe": labelled_eval(alpha_qe(q, g, k=2, exclude_self=True), labels, g, labels,
                                      exclude_self=True).map,
            "diffusion": labelled_eval_scores(Diffusion(g).rank_scores(q, exclude_self=True), labels, labels,
                                              exclude_self=True).map,
        }
        for method, value in want.items():
            assert abs(got[method]["map"] - value) < TOL, (role, method)
    assert "+ diffusion" in proc.stdout


def test_the_command_runs_without_torch(tiny_bundle, ukbench_dir, tmp_path):
    """The runtime install (no torch) evaluates a bundle: torch, timm and torchvision are blocked."""
    code = BLOCK_TORCH + textwrap.dedent(f"""
        from sdk.cli import app
        try:
            app(["evaluate", {str(tiny_bundle)!r}, "--images", {str(ukbench_dir)!r}, "--out", {str(tmp_path)!r},
                 "--no-progress"])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print("torch loaded:", sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch loaded: []" in proc.stdout and (tmp_path / "report.html").is_file()


@pytest.fixture(scope="module")
def query_only_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("query-only"), seed=2, gallery=False)


def _folder(tmp_path: Path, files: dict[str, Path | bytes]) -> Path:
    root = tmp_path / "images"
    for name, src in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            (root / name).write_bytes(src)
        else:
            shutil.copy(src, root / name)
    return root


def test_bad_input_is_one_line(tiny_bundle, other_space_bundle, query_only_bundle, ukbench_dir, tmp_path):
    u = sorted(ukbench_dir.glob("*.jpg"))
    flat = _folder(tmp_path / "flat", {"cat.jpg": u[0], "dog.jpg": u[4], "bird.jpg": u[8]})
    one_class = _folder(tmp_path / "one", {"chairs/a.jpg": u[0], "chairs/b.jpg": u[1]})
    broken = _folder(tmp_path / "broken", {"x/a.jpg": b"junk", "x/b.jpg": b"", "y/c.jpg": b"\xff\xd8"})
    cases = [
        ([tiny_bundle, "--images", flat], "has no class subfolders"),  # file names give no shared labels
        ([tiny_bundle, "--images", flat, "--labels", "folders"], "has no class subfolders"),
        ([tiny_bundle, "--images", one_class], "are one class ('chairs')"),
        ([tiny_bundle, "--images", broken], "none of the images could be read"),
        ([tiny_bundle, "--images", tmp_path / "nowhere"], "is not a folder"),
        ([query_only_bundle, "--images", ukbench_dir], "has no gallery model"),
        ([query_only_bundle, "--images", ukbench_dir, "--gallery-bundle", other_space_bundle], "embedding space"),
        ([tiny_bundle, "--images", ukbench_dir, "--rerank", "magic"], "--rerank must be one of"),
        ([tiny_bundle, "--images", ukbench_dir, "--labels", "nofile.csv"], "nor an existing CSV file"),
        ([tiny_bundle, "--images", ukbench_dir, "--protocol", "revisited"], "needs --gnd"),
    ]
    for args, message in cases:
        proc = evaluate(*args, "--out", tmp_path / "out")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert lines[-1].startswith("error: ") and message in lines[-1], (message, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert "--gallery-bundle" in evaluate(query_only_bundle, "--images", ukbench_dir, "--out", tmp_path / "o").stderr


def test_a_query_only_bundle_evaluates_with_a_gallery_bundle(tiny_bundle, query_only_bundle, ukbench_dir, tmp_path):
    from sdk.bundle import read_manifest, write_manifest

    # the query-only bundle in the tiny bundle's space (its own files, the manifest rewritten)
    same_space = tmp_path / "q"
    shutil.copytree(query_only_bundle, same_space)
    m = read_manifest(same_space)
    m.embedding_space = read_manifest(tiny_bundle).embedding_space
    write_manifest(same_space, m)
    proc = evaluate(same_space, "--images", ukbench_dir, "--gallery-bundle", tiny_bundle, "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = results(tmp_path / "o")
    assert res["gallery_file"] == str(tiny_bundle / "gallery.onnx")
    assert [f["path"] for f in res["files"]] == ["query.onnx", str(tiny_bundle / "gallery.onnx")]


def test_interpolated_precision_of_a_known_list():
    from sdk.eval_metrics import RECALL_LEVELS, interpolated_precision

    # positives at ranks 1 and 3 of 4 positives: precision 1 up to recall .25, 2/3 up to .5, then 0
    p = interpolated_precision(np.array([True, False, True, False]), 4)
    assert np.allclose(p[RECALL_LEVELS <= 0.25], 1.0)
    assert np.allclose(p[(RECALL_LEVELS > 0.25) & (RECALL_LEVELS <= 0.5)], 2 / 3)
    assert np.allclose(p[RECALL_LEVELS > 0.5], 0.0)


@pytest.mark.slow
def test_metrics_memory_grows_with_the_set_not_its_square():
    """12k x 12k leave-one-out: the whole score matrix would take 576 MB; the query blocks keep numpy's peak
    far below (faiss's own buffers are bounded by the block size too)."""
    from sdk.eval_metrics import GallerySearch, Labels, labelled_side

    n, d = 12_000, 32
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n // 4, d)).astype(np.float32)
    x = np.repeat(centres, 4, axis=0) + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n // 4), 4)
    tracemalloc.start()
    r = labelled_side(x, x, Labels(labels, labels, True), GallerySearch(x), top_k=1000, grid_k=8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 0.0 < r.map <= 1.0 and r.top_ids.shape == (n, 8)
    assert r.hist_pos.sum() == n * 3 and r.hist_neg.sum() == n * (n - 4)
    assert peak < 200e6, f"peak {peak / 1e6:.0f} MB"
