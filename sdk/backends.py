"""The one runtime layer for exported files: opens a bundle file with its runtime (ONNX Runtime, LiteRT,
Core ML on macOS) and runs it on a preprocessed float32 batch, converting int8 input/output.

`sdk.Embedder`, the server (through the embedder), export's parity checks, int8 search and `verify`,
and the benchmarks all run files through `open_runner`, so what `verify` measures is what ships.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdk.bundle import ModelFile
from sdk.errors import SdkError
from sdk.preprocess import PreprocessSpec

BACKENDS = ("onnx", "tflite", "coreml")
MAX_BATCH = 16  # dynamic-batch files run at most this many images per call (bounded memory)
LITERT_HINT = "pip install ai-edge-litert"


class BackendError(SdkError, RuntimeError):
    """A runtime is missing or cannot run the model file."""


@contextlib.contextmanager
def quiet_fds():
    """Silence C++ logging written straight to file descriptors 1 and 2 (MLIR converter, XNNPACK)."""
    try:
        sys.stdout.flush(), sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError):  # no real descriptors (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session: all graph optimizations, `threads` intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or 0  # 0: ORT's default (all physical cores)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    # x86 CPUs with AVX2/AVX-512 but no VNNI (e.g. AMD Zen 2/3) saturate int16 sums in the fast u8 x s8 int8
    # kernels: an int8 query model's cosine to fp32 fell from 0.995 to 0.976 there. This makes onnxruntime use
    # exact u8 x u8 kernels on those CPUs only (a no-op on VNNI and ARM), at about 1.2x int8 latency.
    opts.add_session_config_entry("session.x64quantprecision", "1")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (ORT raises its own exception types)
        raise BackendError(f"onnxruntime cannot load {path}: {_first_line(e)} (re-export the bundle)") from None


def litert_interpreter(path: str | Path, threads: int | None = None):
    """A LiteRT interpreter (XNNPACK) with `threads` threads (None: every core), tensors allocated."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise BackendError(f"the tflite backend needs LiteRT, which is not installed: {LITERT_HINT} "
                           "(or use backend='onnx')") from None
    try:
        with quiet_fds():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            interp = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
            interp.allocate_tensors()
    except Exception as e:  # noqa: BLE001
        raise BackendError(f"LiteRT cannot load {path}: {_first_line(e)} (re-export the bundle)") from None
    return interp


def coreml_can_predict() -> bool:
    """Core ML prediction needs macOS (the Core ML framework)."""
    return sys.platform == "darwin"


@dataclass
class Runner:
    """One opened model file. `embed(x)`: a float32 batch in the file's layout -> float32 (N, D)."""

    file: ModelFile
    layout: str  # "NCHW" or "NHWC": what `embed` takes
    dynamic_hw: bool  # accepts input sizes other than the one it was exported at
    run: Callable[[np.ndarray], np.ndarray]  # one call of the runtime on a batch it accepts
    fixed_batch: int | None = None

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Run a batch of any size: one image at a time for batch-1 files, MAX_BATCH at a time otherwise."""
        if self.fixed_batch is not None and self.fixed_batch != 1 and len(x) != self.fixed_batch:
            raise BackendError(f"model file {self.file.path} has fixed batch {self.fixed_batch}")
        step = self.fixed_batch or MAX_BATCH
        parts = [self.run(np.ascontiguousarray(x[i:i + step], dtype=np.float32)) for i in range(0, len(x), step)]
        return np.concatenate(parts).astype(np.float32, copy=False).reshape(len(x), -1)

    def embed_nchw(self, x: np.ndarray) -> np.ndarray:
        """Like `embed`, for a normalised NCHW batch (export's and verify's common input)."""
        return self.embed(x.transpose(0, 2, 3, 1) if self.layout == "NHWC" else x)


def open_runner(path: str | Path, file: ModelFile, threads: int | None = None,
                spec: PreprocessSpec | None = None) -> Runner:
    """A runner for the model file at `path` (described by `file`); BackendError when its runtime is not
    available here. `spec` is needed by Core ML packages with an image input (pixels are fed back)."""
    path = Path(path)
    fixed = None if file.batch == "dynamic" else int(file.batch)
    if file.format == "onnx":
        return _onnx_runner(path, file, threads, fixed)
    if file.format == "tflite":
        return _litert_runner(path, file, threads, fixed)
    if file.format == "coreml":
        return Runner(file, "NCHW", False, _coreml_predictor(path, spec), fixed)
    raise BackendError(f"no runtime for format {file.format!r}; choose one of {BACKENDS}")


def _onnx_runner(path: Path, file: ModelFile, threads: int | None, fixed: int | None) -> Runner:
    session = onnx_session(path, threads)
    inputs = session.get_inputs()
    name = file.input_name if file.input_name in {i.name for i in inputs} else inputs[0].name
    dynamic_hw = not [d for d in inputs[0].shape[2:] if isinstance(d, int)]
    return Runner(file, "NCHW", dynamic_hw, lambda x: session.run(None, {name: x})[0], fixed)


def _litert_runner(path: Path, file: ModelFile, threads: int | None, fixed: int | None) -> Runner:
    """LiteRT: NHWC, usually batch 1; the input is resized on the fly for other shapes; int8 I/O converted."""
    interp = litert_interpreter(path, threads)
    details = {}

    def refresh() -> None:
        details.update(input=interp.get_input_details()[0], output=interp.get_output_details()[0])
        details["shape"] = tuple(details["input"]["shape"])

    def run(x: np.ndarray) -> np.ndarray:
        if tuple(x.shape) != details["shape"]:
            try:
                interp.resize_tensor_input(details["input"]["index"], list(x.shape))
                interp.allocate_tensors()
            except Exception as e:  # noqa: BLE001
                raise BackendError(f"this TFLite model cannot take input shape {x.shape} ({e}); use backend='onnx' "
                                   "for multi-scale or batched embedding") from None
            refresh()
        inp, out = details["input"], details["output"]
        dtype = np.dtype(inp["dtype"])
        if dtype.kind in "iu":  # full-integer model: quantise the float input
            scale, zero = inp.get("quantization", (0.0, 0))
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        interp.set_tensor(inp["index"], x.astype(dtype, copy=False))
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if np.dtype(out["dtype"]).kind in "iu":
            scale, zero = out.get("quantization", (0.0, 0))
            y = (y.astype(np.float32) - zero) * scale
        return y

    refresh()
    return Runner(file, "NHWC", False, run, fixed)


def _coreml_predictor(path: Path, spec: PreprocessSpec | None) -> Callable[[np.ndarray], np.ndarray]:
    """Core ML on macOS, CPU only (deterministic, comparable to torch); image-input packages get pixels back."""
    if not coreml_can_predict():
        raise BackendError("CoreML prediction needs macOS")
    try:
        import coremltools as ct
    except ImportError:
        raise BackendError("running .mlpackage files needs coremltools: pip install 'coremltools==9.0'") from None
    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    is_image = model.get_spec().description.input[0].type.WhichOneof("Type") == "imageType"
    if is_image and spec is None:
        raise BackendError(f"{path} takes an image: open it with the model's preprocessing spec")

    def predict(batch: np.ndarray) -> np.ndarray:
        outs = []
        for x in batch:
            if is_image:
                from PIL import Image

                mean, std = np.asarray(spec.mean)[:, None, None], np.asarray(spec.std)[:, None, None]
                pixels = np.clip(np.rint((x * std + mean) * spec.value_range), 0, 255).astype(np.uint8)
                feed = Image.fromarray(pixels.transpose(1, 2, 0))
            else:
                feed = x[None].astype(np.float32)
            outs.append(np.asarray(model.predict({"image": feed})["embedding"], np.float32).reshape(1, -1))
        return np.concatenate(outs)

    return predict
