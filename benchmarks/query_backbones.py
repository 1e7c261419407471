"""Phone-side cost of the quickstart's candidate query models beside its gallery model: parameters and
onnxruntime fp32 latency (batch 1, one thread), each model exported as the quickstart builds it (backbone +
GeM + 128-d FC), timed in interleaved rounds (export_latency's `_timed_rounds`) and reported as a ratio to
the gallery's (EfficientNet-Lite2 at --size) measured in the same run. A candidate is a backbone at the
gallery's input size, or the gallery's own backbone at a smaller query side (QUERY_SIZES, fractions of
--size: 0.9, 0.85 and 0.8 give 144, 136 and 128 px at 160; the quickstart's `--query-size`).

    python benchmarks/query_backbones.py [--size 160] [--rounds 7] [--calls 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.export_latency import _timed_rounds  # noqa: E402

BACKBONES = ("mobilenetv2_100", "efficientnet_lite0", "efficientnet_lite1")
GALLERY = "efficientnet_lite2"
QUERY_SIZES = (0.9, 0.85, 0.8)  # the gallery's backbone at these fractions of its input side


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=160, help="input side in px (the quickstart's 160)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args(argv)

    from export.onnx import export_onnx
    from sdk.backends import onnx_session
    from training.models import EmbeddingModel, ModelConfig

    rng = np.random.default_rng(0)
    candidates = {f"{name}@{args.size}": (name, args.size) for name in (*BACKBONES, GALLERY)}
    candidates |= {f"{GALLERY}@{round(args.size * f)}": (GALLERY, round(args.size * f)) for f in QUERY_SIZES}
    gallery = f"{GALLERY}@{args.size}"
    fns, params = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (name, size) in candidates.items():
            model = EmbeddingModel(ModelConfig(name, "gem", embedding_dim=128, input_size=size), pretrained=True)
            params[key] = sum(p.numel() for p in model.parameters()) / 1e6
            path = export_onnx(model.eval(), Path(tmp) / f"{key}.onnx", (size, size))
            session = onnx_session(path, threads=1)
            feed = {session.get_inputs()[0].name: rng.random((1, 3, size, size), dtype=np.float32)}
            fns[key] = lambda s=session, f=feed: s.run(None, f)
        ms = _timed_rounds(fns, args.rounds, args.calls)
    print(f"{'model (+ GeM + 128-d FC) @ px':32s}{'params':>9s}{'ms':>8s}{'x gallery':>11s}   (onnxruntime fp32, "
          f"batch 1, 1 thread; the gallery: {gallery})")
    for key in candidates:
        print(f"{key:32s}{params[key]:8.2f}M{ms[key]:8.1f}{ms[key] / ms[gallery]:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
