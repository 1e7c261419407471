"""Run a bundle file with its own runtime (onnxruntime, ai-edge-litert, Core ML on macOS) on a normalised
NCHW float32 batch, so `verify` and the benchmark compare every file on identical input."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from export.errors import ExportError
from sdk.bundle import ModelFile
from sdk.preprocess import PreprocessSpec


def l2_normalize(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def compare_embeddings(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs diff, min cosine) between two (N, D) embedding arrays."""
    return float(np.abs(a - b).max()), float((l2_normalize(a) * l2_normalize(b)).sum(1).min())


@dataclass
class Runner:
    """embed(x): (N,3,H,W) float32 normalised batch -> (N, D) float32 embeddings."""

    file: ModelFile
    embed: Callable[[np.ndarray], np.ndarray]
    dynamic_hw: bool  # accepts input sizes other than the spec's


def open_runner(bundle: str | Path, file: ModelFile, spec: PreprocessSpec, threads: int | None = 1) -> Runner:
    """A runner for one bundle file (ExportError when its runtime is not available here)."""
    path = Path(bundle) / file.path
    if file.format == "onnx":
        from export.onnx import session

        sess = session(path, threads)
        fixed = [d for d in sess.get_inputs()[0].shape[2:] if isinstance(d, int)]

        def embed_onnx(x):
            return np.concatenate([sess.run(None, {file.input_name: np.ascontiguousarray(x[i:i + 16])})[0]
                                   for i in range(0, len(x), 16)]).astype(np.float32)

        return Runner(file, embed_onnx, dynamic_hw=not fixed)
    if file.format == "tflite":
        from export.tflite import interpreter, run

        interp = interpreter(path, threads)
        return Runner(file, lambda x: run(interp, x.transpose(0, 2, 3, 1)), dynamic_hw=False)
    if file.format == "coreml":
        from export.coreml import can_predict, predict

        if not can_predict():
            raise ExportError("CoreML prediction needs macOS")
        return Runner(file, lambda x: predict(path, x, spec, threads), dynamic_hw=False)
    raise ExportError(f"unknown format {file.format!r}")


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
