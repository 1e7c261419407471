"""Phone-side cost of the quickstart's candidate query backbones beside its gallery model: parameters and
onnxruntime fp32 latency (batch 1, one thread), each model exported as the quickstart builds it (backbone +
GeM + 128-d FC), timed in interleaved rounds (export_latency's `_timed_rounds`) and reported as a ratio to
the gallery's (EfficientNet-Lite2) measured in the same run.

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

CANDIDATES = ("mobilenetv2_100", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
GALLERY = "efficientnet_lite2"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=160, help="input side in px (the quickstart's 160)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args(argv)

    from export.onnx import export_onnx
    from sdk.backends import onnx_session
    from training.models import EmbeddingModel, ModelConfig

    x = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
    fns, params = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CANDIDATES:
            model = EmbeddingModel(ModelConfig(name, "gem", embedding_dim=128, input_size=args.size), pretrained=True)
            params[name] = sum(p.numel() for p in model.parameters()) / 1e6
            path = export_onnx(model.eval(), Path(tmp) / f"{name}.onnx", (args.size, args.size))
            session = onnx_session(path, threads=1)
            feed = {session.get_inputs()[0].name: x}
            fns[name] = lambda s=session, f=feed: s.run(None, f)
        ms = _timed_rounds(fns, args.rounds, args.calls)
    print(f"{'model (+ GeM + 128-d FC)':28s}{'params':>9s}{'ms':>8s}{'x gallery':>11s}   (onnxruntime fp32, batch 1, "
          f"1 thread, {args.size} px)")
    for name in CANDIDATES:
        print(f"{name:28s}{params[name]:8.2f}M{ms[name]:8.1f}{ms[name] / ms[GALLERY]:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
