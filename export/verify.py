"""`retrieval-sdk verify BUNDLE`: run every file of a bundle with every runtime available here on sample
images and compare with the torch model the bundle was exported from.

Per file: size (and ratio to the fp32 file of the same format), max abs diff and min cosine to torch,
min cosine to the fp32 file, retrieval mAP on each labelled image set, latency per image (batch 1).
mAP (leave-one-out) ranks each file's embeddings against the fp32 embeddings of its own model (torch,
else the fp32 ONNX file): int8 queries against an fp32 gallery, what a bundle without a gallery model
serves (the SDK embeds the gallery side with the most precise file). That is the quantization check.
In a bundle with a gallery model the query files are also ranked against the gallery model's
embeddings (asymmetric mAP): printed, not checked, because it measures how well the query model was
trained into the gallery's space as much as the export.
Then ONNX at several input sizes (dynamic H/W), tflite-support's ImageEmbedder against our LiteRT
path on the same .tflite, and the acceptance checks (docs/export.md) with PASS/FAIL.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from export.errors import ExportError
from export.images import ImageSet, load_image_set
from sdk.backends import BackendError, Runner, open_runner
from sdk.bundle import Manifest, ModelEntry, ModelFile, read_manifest
from sdk.preprocess import PreprocessSpec, normalize
from sdk.vectors import compare_embeddings, l2_normalize

FP32_MAX_ABS_DIFF = 1e-4
INT8_MIN_COSINE = 0.99
INT8_MAX_SIZE_RATIO = 0.30
INT8_MAX_MAP_DROP = 0.01  # 1 mAP point
FP16_MIN_COSINE = 0.999
EMBEDDER_MAX_ABS_DIFF = 1e-4  # float files: the same kernels, the same numbers
# int8 files: tflite-support 0.4.4 bundles a 2022 TFLite runtime whose int8 kernels round differently
# from ai-edge-litert 2.3's, so the two are close but not bit-identical
EMBEDDER_INT8_MIN_COSINE = 0.9999


@dataclass
class FileResult:
    role: str
    path: str
    format: str
    precision: str
    size_bytes: int
    size_ratio: float | None = None  # to the fp32 file of the same role and format
    max_abs_diff: float | None = None  # to torch, over all images
    min_cos_torch: float | None = None  # on the photo sets (see _min_on_photos)
    min_cos_fp32: float | None = None  # to the fp32 file of the same role and format, on the photo sets
    min_cos_fp32_by_set: dict[str, float] = field(default_factory=dict)
    maps: dict[str, float] = field(default_factory=dict)  # image set -> mAP against its own model's fp32 gallery
    asym_maps: dict[str, float] = field(default_factory=dict)  # query files: against the gallery model
    ms: float | None = None  # per image, batch 1
    note: str = ""


@dataclass
class SizeResult:
    path: str
    size: tuple[int, int]
    max_abs_diff: float
    min_cos: float


@dataclass
class EmbedderResult:
    path: str
    max_abs_diff: float | None = None
    min_cos: float | None = None
    ms_ours: float | None = None
    ms_task_library: float | None = None
    note: str = ""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class VerifyReport:
    bundle: str
    image_sets: list[dict]
    threads: int
    files: list[FileResult] = field(default_factory=list)
    sizes: list[SizeResult] = field(default_factory=list)
    embedders: list[EmbedderResult] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def synthetic_sets(self) -> set[str]:
        """Names of the procedural image sets (the cosine targets are about photos)."""
        return {s["name"] for s in self.image_sets if s.get("synthetic")}

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)


def latency_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3, max_seconds: float = 20.0) -> float:
    """Median wall time of fn() in milliseconds (stops early after max_seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return 1000.0 * float(np.median(times))


def _map(query: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> float:
    from training.evaluate import labelled_eval

    return labelled_eval(l2_normalize(query), labels, l2_normalize(gallery), labels, ks=(1,), exclude_self=True).map


def _retrieval(row: FileResult, embs: dict, own: dict, gallery_index: dict, sets: dict[str, ImageSet]) -> None:
    """mAP per labelled set against `own` (fp32 embeddings of the row's model) and, when `gallery_index`
    (the gallery model's embeddings) is given, against it: see the module docstring."""
    for name, s in sets.items():
        if s.labels is not None:
            row.maps[name] = _map(embs[name], own[name], s.labels)
            if gallery_index:
                row.asym_maps[name] = _map(embs[name], gallery_index[name], s.labels)


def _torch_model(entry: ModelEntry, override: str | Path | None, bundle: Path, notes: list[str]):
    """The source model (checkpoint from the manifest or the override), or None with a note."""
    candidates = [Path(override)] if override else [Path(entry.source_checkpoint),
                                                    bundle / Path(entry.source_checkpoint).name]
    for c in candidates:
        if str(c) and c.is_file():
            from training.models import load_checkpoint

            model, _ = load_checkpoint(c)
            return model
    notes.append(f"{entry.role}: source checkpoint {entry.source_checkpoint or '?'} not found, so no comparison "
                 f"with torch (pass --checkpoint{' ' if entry.role == 'query' else ' --gallery-checkpoint '}PATH)")
    return None


def verify_bundle(bundle: str | Path, images: Iterable[str | Path] = (), checkpoint: str | Path | None = None,
                  gallery_checkpoint: str | Path | None = None, threads: int = 1, runs: int = 10,
                  tflite_support: bool = True, max_images: int = 200, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> VerifyReport:
    """Run every file of the bundle; see the module docstring. Raises BundleError/ExportError on a
    malformed bundle or bad image folders."""
    import torch
    from tqdm.auto import tqdm

    from training.data import is_instance_set_image, make_instance_set

    log = log or (lambda msg: None)
    bundle = Path(bundle)
    manifest: Manifest = read_manifest(bundle, verify=True)  # sha256 of every file
    images = [Path(p) for p in images]
    with tempfile.TemporaryDirectory() as tmp:
        if not images:
            log("no --images given: using a procedural labelled set (8 objects x 4 views); "
                "pass --images DIR for photos")
            images = [Path(tmp) / "procedural"]
            make_instance_set(images[0], n_objects=8, n_views=4, image_size=224, seed=0)
        report = VerifyReport(str(bundle), [], threads)
        report.checks.append(Check("manifest: every file present, sha256 matches", True,
                                   f"{sum(len(e.files) for e in manifest.models.values())} files"))
        roles = [r for r in ("gallery", "query") if r in manifest.models]  # gallery first: queries use its index
        sets: dict[str, dict[str, ImageSet]] = {}
        for role in roles:
            spec = manifest.models[role].preprocess
            sets[role] = {s.name: s for s in (load_image_set(folder, spec, max_images=max_images, what="verify image",
                                                             progress=progress) for folder in images)}
        for s in sets[roles[-1]].values():  # synthetic: written by make_instance_set, not photos
            synthetic = bool(s.paths) and all(is_instance_set_image(p) for p in s.paths)
            report.image_sets.append({"name": s.name, "images": len(s.paths), "synthetic": synthetic,
                                      "labelled": s.labels is not None,
                                      "classes": 0 if s.labels is None else int(len(np.unique(s.labels)))})
        gallery_index: dict[str, np.ndarray] = {}
        for role in roles:
            entry = manifest.models[role]
            spec = entry.preprocess
            model = _torch_model(entry, checkpoint if role == "query" else gallery_checkpoint, bundle, report.notes)
            xs = {name: s.batch(spec) for name, s in sets[role].items()}
            asym_index = gallery_index if role == "query" else {}  # queries are also ranked against the gallery
            refs = {}
            if model is not None:
                with torch.no_grad():
                    refs = {name: np.concatenate([model(torch.from_numpy(x[i:i + 16])).numpy()
                                                  for i in range(0, len(x), 16)]) for name, x in xs.items()}
                    previous = torch.get_num_threads()
                    torch.set_num_threads(threads)
                    first = torch.from_numpy(next(iter(xs.values()))[:1])
                    torch_ms = latency_ms(lambda: model(first), runs=runs)
                    torch.set_num_threads(previous)
                row = FileResult(role, "(torch eager)", "torch", "fp32", 0, ms=torch_ms, note="reference")
                _retrieval(row, refs, refs, asym_index, sets[role])
                report.files.append(row)
            fp32_embs: dict[str, dict[str, np.ndarray]] = {}
            ordered = sorted(entry.files, key=lambda f: (f.format, f.precision != "fp32"))
            bar = tqdm(ordered, desc=f"verifying {role} files", unit="file", disable=not progress, leave=False)
            for f in bar:
                report.files.append(_verify_file(bundle, entry, f, spec, xs, refs, sets[role], threads, runs, report,
                                                 asym_index, fp32_embs, model))
            if role == "gallery":
                gallery_index.update(fp32_embs.get("onnx") or refs)
        if tflite_support:
            _verify_task_library(bundle, manifest, sets, threads, runs, report, log)
        _acceptance(report)
    return report


def _verify_file(bundle: Path, entry: ModelEntry, f: ModelFile, spec: PreprocessSpec, xs: dict, refs: dict,
                 sets: dict[str, ImageSet], threads: int, runs: int, report: VerifyReport,
                 gallery_index: dict, fp32_embs: dict, model) -> FileResult:
    result = FileResult(entry.role, f.path, f.format, f.precision, f.size_bytes)
    fp32 = next((g for g in entry.files if g.format == f.format and g.precision == "fp32"), None)
    if fp32 is not None and f.precision != "fp32" and fp32.size_bytes:
        result.size_ratio = f.size_bytes / fp32.size_bytes
    try:
        runner = open_runner(bundle / f.path, f, threads, spec)
    except BackendError as e:
        if f.format == "coreml":
            return _verify_coreml_here(bundle, entry, f, spec, xs, refs, result, model, str(e),
                                       report.synthetic_sets)
        result.note = f"not run: {e}"
        return result
    embs = {name: runner.embed_nchw(x) for name, x in xs.items()}
    if f.precision == "fp32":
        fp32_embs[f.format] = embs
    if refs:
        diffs = {n: compare_embeddings(embs[n], refs[n]) for n in embs}
        result.max_abs_diff = max(d for d, _ in diffs.values())  # every set: the fp32 parity check is strict
        result.min_cos_torch = _min_on_photos({n: c for n, (_, c) in diffs.items()}, report.synthetic_sets)
    if f.precision != "fp32" and f.format in fp32_embs:
        result.min_cos_fp32_by_set = {n: compare_embeddings(embs[n], fp32_embs[f.format][n])[1] for n in embs}
        result.min_cos_fp32 = _min_on_photos(result.min_cos_fp32_by_set, report.synthetic_sets)
    own = refs or fp32_embs.get("onnx") or fp32_embs.get(f.format) or embs
    _retrieval(result, embs, own, gallery_index, sets)
    first = next(iter(xs.values()))[:1]
    result.ms = latency_ms(lambda: runner.embed_nchw(first), runs=runs)
    if f.format == "onnx" and runner.dynamic_hw and model is not None:
        _verify_sizes(f, runner, spec, sets, model, report)
    return result


def _min_on_photos(values: dict[str, float], synthetic: set[str]) -> float:
    """The minimum over the photo sets (the acceptance asks cosine on real photos; procedural images are
    reported in a note), over all sets when only procedural ones were given."""
    photos = [v for name, v in values.items() if name not in synthetic]
    return min(photos or values.values())


def _verify_coreml_here(bundle, entry, f, spec, xs, refs, result, model, why, synthetic) -> FileResult:
    """Linux: structural validation plus the torch proxy of the file's precision."""
    import torch

    from export.coreml import check_coreml, proxy_model

    try:
        facts = check_coreml(bundle / f.path, entry.embedding_dim, spec, f.precision)
    except ExportError as e:
        result.note = f"structural check FAILED: {e}"
        return result
    result.note = (f"structural check ok ({facts.get('input_type')} input {facts.get('input_shape')}, "
                   f"weights {facts.get('weight_dtypes')}); {why}")
    if model is not None and f.precision != "fp32":
        with torch.no_grad():
            proxy = proxy_model(model, f.precision)
            embs = {n: proxy(torch.from_numpy(x)).float().numpy() for n, x in xs.items()}
        result.min_cos_fp32 = _min_on_photos({n: compare_embeddings(embs[n], refs[n])[1] for n in embs}, synthetic)
        result.note += f"; min cosine of the {f.precision} torch proxy to fp32: {result.min_cos_fp32:.5f}"
    return result


def onnx_check_sizes(spec: PreprocessSpec) -> list[tuple[int, int]]:
    """The spec size, a smaller and a larger non-square one (multiples of 8)."""
    h, w = spec.input_size
    r8 = lambda v: max(32, int(round(v / 8)) * 8)  # noqa: E731
    return [(h, w), (r8(h * 0.75), r8(w * 0.75)), (r8(h * 1.25), r8(w))]


def _verify_sizes(f: ModelFile, runner: Runner, spec: PreprocessSpec, sets: dict[str, ImageSet], model, report) -> None:
    import torch

    from sdk.preprocess import preprocess_image

    s = next(iter(sets.values()))
    if not s.paths:
        return
    for size in onnx_check_sizes(spec):
        sized = spec.with_size(size)
        x = np.stack([preprocess_image(p, sized) for p in s.paths[:8]])
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        diff, cos = compare_embeddings(runner.embed_nchw(x), ref)
        report.sizes.append(SizeResult(f.path, tuple(size), diff, cos))


def _verify_task_library(bundle: Path, manifest: Manifest, sets: dict, threads: int, runs: int,
                         report: VerifyReport, log) -> None:
    """tflite-support's ImageEmbedder (isolated env, normalisation from the file's metadata) against our
    LiteRT path (sdk preprocessing + ai-edge-litert) on the same .tflite and the same resized pixels."""
    from export import tflite_support_env as tfs

    for role, entry in manifest.models.items():
        spec = entry.preprocess
        for f in entry.files:
            if f.format != "tflite":
                continue
            res = EmbedderResult(f.path)
            report.embedders.append(res)
            pixels = np.concatenate([s.pixels for s in sets[role].values()])
            try:
                theirs, res.ms_task_library = tfs.image_embedder(bundle / f.path, pixels, threads=threads,
                                                                 repeats=runs)
            except ExportError as e:
                res.note = f"not run: {e}"
                continue
            runner = open_runner(bundle / f.path, f, threads, spec)

            def ours_one(p):
                return runner.embed_nchw(normalize(p, spec)[None])  # NCHW per the spec

            ours = np.concatenate([ours_one(p) for p in pixels])
            res.max_abs_diff, res.min_cos = compare_embeddings(theirs, ours)
            res.ms_ours = latency_ms(lambda: ours_one(pixels[0]), runs=runs)


def _acceptance(report: VerifyReport) -> None:
    rows = {(r.role, r.path): r for r in report.files}
    synthetic = report.synthetic_sets
    for r in report.files:
        if r.format not in ("onnx", "tflite"):
            if r.format == "coreml":
                report.checks.append(Check(f"{r.path}: CoreML contract (structure{'' if 'structural' in r.note else ', prediction'})",
                                           "FAILED" not in r.note and "not run" not in r.note, r.note[:120]))
            continue
        if r.note.startswith("not run"):
            report.checks.append(Check(f"{r.path}: runs here", False, r.note))
            continue
        if r.precision == "fp32" and r.max_abs_diff is not None:
            report.checks.append(Check(f"{r.path}: max abs diff to torch <= {FP32_MAX_ABS_DIFF:g}",
                                       r.max_abs_diff <= FP32_MAX_ABS_DIFF, f"{r.max_abs_diff:.2e}"))
        if r.precision in ("int8", "fp16"):
            floor = INT8_MIN_COSINE if r.precision == "int8" else FP16_MIN_COSINE
            for name, cos in r.min_cos_fp32_by_set.items():
                if name in synthetic:
                    report.notes.append(f"{r.path}: min cosine to fp32 on {name} (synthetic, procedural images) "
                                        f"{cos:.5f}: reported, not checked (the acceptance asks it on real photos)")
                    continue
                report.checks.append(Check(f"{r.path}: min cosine to fp32 on {name} >= {floor}", cos >= floor,
                                           f"{cos:.5f}"))
        if r.precision == "int8" and r.size_ratio is not None:
            report.checks.append(Check(f"{r.path}: size <= {INT8_MAX_SIZE_RATIO:.0%} of fp32",
                                       r.size_ratio <= INT8_MAX_SIZE_RATIO, f"{r.size_ratio:.1%}"))
        if r.precision == "int8":
            fp32 = rows.get((r.role, r.path.replace(".int8.", ".")))
            for name, m in r.maps.items():
                if fp32 is not None and name in fp32.maps:
                    drop = fp32.maps[name] - m
                    report.checks.append(Check(f"{r.path}: mAP on {name} within 1 point of fp32",
                                               drop <= INT8_MAX_MAP_DROP + 1e-9,
                                               f"{m * 100:.2f} vs {fp32.maps[name] * 100:.2f}"))
            for name, m in r.asym_maps.items():
                if fp32 is not None and fp32.asym_maps.get(name, m) - m > INT8_MAX_MAP_DROP + 1e-9:
                    report.notes.append(
                        f"{r.path}: asymmetric mAP on {name} (against the gallery model) {m * 100:.2f} vs "
                        f"{fp32.asym_maps[name] * 100:.2f} for fp32: reported, not checked (it also measures how "
                        f"closely the query model was trained into the gallery's space; see docs/export.md)")
    for s in report.sizes:
        if ".int8." not in s.path and ".fp16." not in s.path:
            report.checks.append(Check(f"{s.path} at {s.size[0]}x{s.size[1]}: max abs diff to torch <= "
                                       f"{FP32_MAX_ABS_DIFF:g}", s.max_abs_diff <= FP32_MAX_ABS_DIFF,
                                       f"{s.max_abs_diff:.2e}"))
    for e in report.embedders:
        if e.max_abs_diff is None:
            report.checks.append(Check(f"{e.path}: tflite-support ImageEmbedder runs", False, e.note))
        elif ".int8." in e.path:
            report.checks.append(Check(f"{e.path}: ImageEmbedder ~ our embedder (int8 kernels of two runtime "
                                       f"versions; min cosine >= {EMBEDDER_INT8_MIN_COSINE})",
                                       e.min_cos >= EMBEDDER_INT8_MIN_COSINE,
                                       f"min cosine {e.min_cos:.6f}, max abs diff {e.max_abs_diff:.2e}"))
        else:
            report.checks.append(Check(f"{e.path}: ImageEmbedder == our embedder (max abs diff <= "
                                       f"{EMBEDDER_MAX_ABS_DIFF:g})", e.max_abs_diff <= EMBEDDER_MAX_ABS_DIFF,
                                       f"{e.max_abs_diff:.2e}"))


# ------------------------------------------------------------------------------------------- printing


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_report(report: VerifyReport) -> str:
    """The tables `retrieval-sdk verify` prints."""
    lines = [f"bundle {report.bundle}; latency: batch 1, {report.threads} thread(s), median"]
    lines.append("images: " + ", ".join(
        f"{s['name']} ({s['images']} {'synthetic ' if s.get('synthetic') else ''}images"
        + (f", {s['classes']} classes)" if s["labelled"] else ", no labels)") for s in report.image_sets))
    set_names = [s["name"] for s in report.image_sets if s["labelled"]]
    if set_names:
        lines.append("mAP: leave-one-out; each file's embeddings ranked against its own model's fp32 embeddings; "
                     "cosines: min over the photo sets")
    head = (f"{'role':8} {'file':24} {'fmt':7} {'prec':5} {'size':>9} {'%fp32':>6} {'maxdiff':>9} "
            f"{'cos(torch)':>10} {'cos(fp32)':>9} " + " ".join(f"{'mAP ' + n[:12]:>17}" for n in set_names)
            + f" {'ms/img':>8}")
    lines += ["", head, "-" * len(head)]
    notes = []
    for r in report.files:
        maps = " ".join(f"{_f(None if n not in r.maps else r.maps[n] * 100, '.2f'):>17}" for n in set_names)
        size = f"{r.size_bytes / 1e6:.2f} MB" if r.size_bytes else "-"
        lines.append(f"{r.role:8} {r.path[:24]:24} {r.format:7} {r.precision:5} {size:>9} "
                     f"{_f(None if r.size_ratio is None else r.size_ratio * 100, '.1f'):>6} "
                     f"{_f(r.max_abs_diff, '.2e'):>9} {_f(r.min_cos_torch, '.6f'):>10} {_f(r.min_cos_fp32, '.5f'):>9} "
                     f"{maps} {_f(r.ms, '.2f'):>8}")
        if r.note and r.note != "reference":
            notes.append(f"  {r.path}: {r.note}")
    lines += notes
    asym = [r for r in report.files if r.asym_maps]
    if asym:
        lines += ["", "asymmetric mAP: query file against the gallery model's embeddings (a deployment with this "
                      "gallery model; reported, not checked):"]
        lines.append(f"  {'file':24} " + " ".join(f"{'mAP ' + n[:12]:>17}" for n in set_names))
        lines += [f"  {r.path[:24]:24} " + " ".join(
            f"{_f(None if n not in r.asym_maps else r.asym_maps[n] * 100, '.2f'):>17}" for n in set_names)
            for r in asym]
    if report.sizes:
        lines += ["", "ONNX at other input sizes (dynamic height/width), vs torch at the same size:"]
        lines += [f"  {s.path:24} {s.size[0]}x{s.size[1]:<5} max abs diff {s.max_abs_diff:.2e}  "
                  f"min cosine {s.min_cos:.6f}" for s in report.sizes]
    if report.embedders:
        lines += ["", "tflite-support ImageEmbedder (its own normalisation from the TFLite metadata) vs our embedder "
                      "(sdk preprocessing + ai-edge-litert), same file, same pixels:"]
        for e in report.embedders:
            if e.max_abs_diff is None:
                lines.append(f"  {e.path:24} {e.note}")
            else:
                lines.append(f"  {e.path:24} max abs diff {e.max_abs_diff:.2e}  min cosine {e.min_cos:.6f}  "
                             f"ms/img: ImageEmbedder {_f(e.ms_task_library, '.2f')}, ours {_f(e.ms_ours, '.2f')}")
    if report.notes:
        lines += [""] + [f"note: {n}" for n in report.notes]
    lines += ["", "checks:"] + [f"  [{'PASS' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in report.checks]
    failed = sum(not c.passed for c in report.checks)
    lines.append(f"{len(report.checks) - failed} of {len(report.checks)} checks passed" +
                 (f" ({failed} FAILED)" if failed else ""))
    return "\n".join(lines)


def write_json(report: VerifyReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(report), indent=2, default=float))
