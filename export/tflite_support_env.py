"""tflite-support in an isolated environment, driven by subprocess.

tflite-support (the TFLite metadata writer and the Task Library's ImageEmbedder) needs protobuf<4; the
project's onnx needs protobuf>=4. They cannot share one environment, so the export step creates a
small virtualenv on first use (default ~/.cache/retrieval-sdk/tflite-support-env, override with
RETRIEVAL_SDK_TFLITE_SUPPORT_ENV) with only tflite-support, protobuf<4 and numpy<2, and runs
export/_tflite_support_worker.py there with JSON over stdin/stdout. Nothing from that environment is
imported into this process. See docs/export.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from export.errors import ExportError
from sdk.preprocess import PreprocessSpec

ENV_VAR = "RETRIEVAL_SDK_TFLITE_SUPPORT_ENV"
PYTHON_VAR = "RETRIEVAL_SDK_TFLITE_SUPPORT_PYTHON"  # the interpreter to build the env with (3.8 - 3.11)
DEFAULT_ENV = Path("~/.cache/retrieval-sdk/tflite-support-env")
REQUIREMENTS = ("tflite-support==0.4.4", "protobuf>=3.20,<4", "numpy>=1.23,<2")
WORKER = Path(__file__).with_name("_tflite_support_worker.py")
_READY = ".retrieval-sdk-ready"
_REPLY = "@@REPLY@@"


class TfliteSupportError(ExportError):
    """The isolated tflite-support environment cannot be created or run; the message names the fix."""


def env_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ENV).expanduser()


def _env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def is_ready() -> bool:
    """True when the environment exists and was built with the current REQUIREMENTS."""
    marker = env_dir() / _READY
    return marker.is_file() and marker.read_text() == json.dumps(REQUIREMENTS)


@contextlib.contextmanager
def _lock(env: Path):
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / (env.name + ".lock"), "w") as fh:
        with contextlib.suppress(ImportError):  # Windows (no fcntl): no concurrent builds expected
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def ensure_env(log=None) -> Path:
    """The environment's python, creating the environment first if needed (about 20 s, ~300 MB)."""
    env = env_dir()
    if is_ready():
        return _env_python(env)
    with _lock(env):
        if is_ready():
            return _env_python(env)
        base = os.environ.get(PYTHON_VAR) or getattr(sys, "_base_executable", None) or sys.executable
        if log:
            log(f"creating the isolated tflite-support environment in {env} (once; ~20 s)")
        shutil.rmtree(env, ignore_errors=True)
        _run([base, "-m", "venv", str(env)], "create the virtualenv", timeout=300)
        python = _env_python(env)
        _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
             f"pip install {' '.join(REQUIREMENTS)}", timeout=900)
        call("probe", {}, python=python)
        (env / _READY).write_text(json.dumps(REQUIREMENTS))
    return _env_python(env)


def _run(cmd: list[str], what: str, timeout: int) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TfliteSupportError(f"could not {what} for the tflite-support environment ({e})") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        hint = ""
        if "No matching distribution" in proc.stderr or "Could not find a version" in proc.stderr:
            hint = (f"; tflite-support 0.4.4 has wheels for CPython 3.8-3.11 on x86-64 Linux/macOS only: point "
                    f"{PYTHON_VAR} at such an interpreter")
        raise TfliteSupportError(f"could not {what} for the tflite-support environment in {env_dir()}: "
                                 + " | ".join(tail) + hint)


def call(command: str, request: dict, python: Path | None = None, timeout: int = 900) -> dict:
    """Run one worker command in the environment and return its JSON reply."""
    python = python or ensure_env()
    try:
        proc = subprocess.run([str(python), str(WORKER), command], input=json.dumps(request), capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    except subprocess.TimeoutExpired:
        raise TfliteSupportError(f"tflite-support worker '{command}' timed out after {timeout} s") from None
    if proc.returncode != 0 or _REPLY not in proc.stdout:
        err = (proc.stderr or proc.stdout).strip()
        if "libusb-1.0.so" in err:
            raise TfliteSupportError(
                "tflite-support's native library needs libusb-1.0, which is not installed: "
                "sudo apt-get install libusb-1.0-0 (Debian/Ubuntu) or brew install libusb (macOS)")
        raise TfliteSupportError(f"tflite-support worker '{command}' failed: " + " | ".join(err.splitlines()[-4:]))
    return json.loads(proc.stdout.rsplit(_REPLY, 1)[1])


def write_metadata(src: str | Path, dst: str | Path, spec: PreprocessSpec, name: str, embedding_dim: int,
                   space: str, version: str = "1") -> dict:
    """Write standard TFLite metadata (image input with normalisation and colour space, feature output)
    so tflite-support's ImageEmbedder (and Android Studio / ML Kit tooling) can use the file as is."""
    if spec.channel_order != "RGB":
        raise ExportError("TFLite metadata can describe RGB or greyscale input only; this model wants "
                          f"{spec.channel_order}: export with an RGB preprocessing spec")
    # tflite-support normalises raw 0..255 pixels as (p - mean) / std; ours is (p / value_range - mean) / std
    vr = spec.value_range
    req = {
        "src": str(src), "dst": str(dst), "name": name, "version": version, "author": "retrieval-sdk",
        "license": "Apache-2.0",
        "description": f"Image embedding model ({embedding_dim}-d, L2-normalised) of embedding space {space}; "
                       "inner product of two embeddings = cosine similarity.",
        "mean": [m * vr for m in spec.mean], "std": [s * vr for s in spec.std],
        "color_space": spec.channel_order,
        "input_description": (f"RGB image, {spec.input_size[0]}x{spec.input_size[1]} ({spec.resize} resize, "
                              f"{spec.interpolation}), float32 NHWC, normalised (pixel - mean) / std."),
        "output_description": f"Embedding vector, float32, {embedding_dim} values, unit L2 norm.",
        "embedding_dim": embedding_dim,
    }
    return call("write-metadata", req)["metadata"]


def read_metadata(model: str | Path) -> dict | None:
    return call("read-metadata", {"model": str(model)})["metadata"]


def image_embedder(model: str | Path, pixels: np.ndarray, threads: int = 1, repeats: int = 0
                   ) -> tuple[np.ndarray, float | None]:
    """Embed uint8 RGB images (N, H, W, 3), already at the model's input size, with tflite-support's
    ImageEmbedder (its own normalisation from the file's metadata; raw, un-renormalised vectors).
    Returns (embeddings (N, D), median ms per image over `repeats` timed runs or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        px, out = Path(tmp) / "pixels.npy", Path(tmp) / "out.npy"
        np.save(px, np.ascontiguousarray(pixels, dtype=np.uint8))
        reply = call("embed", {"model": str(model), "pixels": str(px), "out": str(out), "threads": threads,
                               "repeats": repeats})
        return np.load(out), reply["ms_per_image"]
