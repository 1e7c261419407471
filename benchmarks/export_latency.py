"""Per-image latency of the exported query model, batch 1, at 1 and 2 threads: torch eager, ONNX fp32/int8
(onnxruntime) and TFLite fp32/int8 (ai-edge-litert), each as a speed-up over torch eager measured in the same
run; then tflite-support's ImageEmbedder against our embedder (sdk preprocessing + ai-edge-litert) on the
same .tflite files, both from the same already-resized uint8 pixels.

Every runtime is timed in interleaved rounds (round-robin, median over all timed calls), so a load spike
on a shared machine hits all of them alike and the ratios stay meaningful.

    python benchmarks/export_latency.py BUNDLE [--images DIR] [--threads 1 2] [--rounds 5] [--calls 10]
    python benchmarks/export_latency.py --export-from runs/quickstart/query.safetensors --calibration DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_INT8_ONNX_SPEEDUP = 5.0


def _timed_rounds(fns: dict, rounds: int, calls: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per call of each fn, measured round-robin over `rounds` rounds of `calls` calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: 1000.0 * float(np.median(v)) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", type=Path, help="bundle folder with query.onnx/.int8.onnx/.tflite/.int8.tflite")
    ap.add_argument("--export-from", type=Path, help="query checkpoint: export a temporary bundle first")
    ap.add_argument("--calibration", type=Path, help="calibration folder for --export-from")
    ap.add_argument("--checkpoint", type=Path, help="torch checkpoint (default: the manifest's source)")
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/real-photos/ukbench-56")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--no-tflite-support", action="store_true", help="skip tflite-support's ImageEmbedder")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    args = ap.parse_args(argv)

    import torch

    from export.images import load_image_set
    from sdk.backends import open_runner
    from sdk.bundle import read_manifest
    from sdk.preprocess import normalize
    from training.models import load_checkpoint

    tmp = tempfile.TemporaryDirectory()
    bundle = args.bundle
    if args.export_from:
        from export.bundle import export_bundle

        bundle = Path(tmp.name) / "bundle"
        print(f"exporting {args.export_from} (onnx + tflite, fp32 + int8) to {bundle} ...", flush=True)
        export_bundle(args.export_from, bundle, formats=("onnx", "tflite"), precisions=("fp32", "int8"),
                      calibration=args.calibration or args.images)
    if bundle is None:
        ap.error("give a BUNDLE folder or --export-from CHECKPOINT")
    entry = read_manifest(bundle).model("query")
    spec = entry.preprocess
    model, _ = load_checkpoint(args.checkpoint or entry.source_checkpoint)
    images = load_image_set(args.images, spec, max_images=16)
    x = images.batch(spec)[:1]
    pixels = images.pixels[:1]
    files = {f"{f.format} {f.precision}": f for f in entry.files
             if f.format in ("onnx", "tflite") and f.precision in ("fp32", "int8")}
    import platform

    print(f"query model {entry.name} ({spec.input_size[0]}x{spec.input_size[1]}, {entry.embedding_dim}-d); "
          f"CPU: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
          f"batch 1; median of {args.rounds} interleaved rounds x {args.calls} calls")
    results: dict = {"model": entry.name, "input_size": list(spec.input_size), "threads": {}}
    for n in args.threads:
        torch.set_num_threads(n)
        tx = torch.from_numpy(x)
        fns = {"torch eager": lambda: model(tx)}
        for name, f in sorted(files.items()):
            fns[name] = (lambda embed: lambda: embed(x))(open_runner(bundle / f.path, f, n, spec).embed_nchw)
        with torch.no_grad():
            ms = _timed_rounds(fns, args.rounds, args.calls)
        results["threads"][n] = {k: {"ms": v, "speedup_vs_torch": ms["torch eager"] / v} for k, v in ms.items()}
        print(f"\n{n} thread(s):")
        print(f"  {'runtime':14} {'ms/img':>8} {'vs torch eager':>15}")
        for k, v in ms.items():
            print(f"  {k:14} {v:8.2f} {ms['torch eager'] / v:14.2f}x")
    if 1 in results["threads"] and "onnx int8" in results["threads"][1]:
        s = results["threads"][1]["onnx int8"]["speedup_vs_torch"]
        verdict = "meets" if s >= TARGET_INT8_ONNX_SPEEDUP else "BELOW"
        print(f"\nint8 ONNX vs torch eager, 1 thread: {s:.2f}x ({verdict} the {TARGET_INT8_ONNX_SPEEDUP:g}x target)")
        results["int8_onnx_speedup_1thread"] = s

    if not args.no_tflite_support:
        from export import tflite_support_env as tfs
        from export.errors import ExportError

        print("\ntflite-support ImageEmbedder vs our embedder (sdk normalisation + ai-edge-litert), same .tflite, "
              "same uint8 pixels, batch 1:")
        results["image_embedder"] = {}
        for n in args.threads:
            for name, f in sorted(files.items()):
                if not name.startswith("tflite"):
                    continue
                try:
                    _, theirs = tfs.image_embedder(bundle / f.path, np.repeat(pixels, 4, axis=0), threads=n,
                                                   repeats=args.rounds * args.calls)
                except ExportError as e:
                    print(f"  {name}: ImageEmbedder not run: {e}")
                    continue
                runner = open_runner(bundle / f.path, f, n, spec)
                ours = _timed_rounds({"ours": lambda: runner.embed_nchw(normalize(pixels[0], spec)[None])},
                                     args.rounds, args.calls)["ours"]
                results["image_embedder"][f"{name} {n}t"] = {"image_embedder_ms": theirs, "ours_ms": ours}
                print(f"  {name:12} {n} thread(s): ImageEmbedder {theirs:7.2f} ms, ours {ours:7.2f} ms "
                      f"(ours / theirs = {ours / theirs:.2f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except Exception as e:  # as the CLI (sdk.cli_errors): a bad bundle, checkpoint or image folder is one
        from sdk.cli_errors import user_error_types  # line; a bug keeps its traceback

        if not isinstance(e, user_error_types()):
            raise
        raise SystemExit(f"error: {e}") from None
