"""Errors a user can fix, each with a message that names the fix (the CLI prints them as one line)."""

from __future__ import annotations

import importlib
from types import ModuleType


class ExportError(ValueError):
    """An export or verify step cannot run as asked (bad input, missing file, parity failure)."""


class MissingDependencyError(ExportError):
    """An optional package of the `export` extra is not installed."""


# module name -> (pip requirement, what needs it)
OPTIONAL = {
    "onnx": ("onnx", "ONNX export"),
    "onnxscript": ("onnxscript", "ONNX export (torch's torch.export-based exporter)"),
    "onnxruntime": ("onnxruntime", "running ONNX files"),
    "coremltools": ("coremltools==9.0", "CoreML export"),
    "litert_torch": ("litert-torch==0.10.0", "TFLite export"),
    "ai_edge_litert": ("ai-edge-litert==2.3.0", "running TFLite files"),
    "ai_edge_quantizer": ("ai-edge-quantizer==0.10.0", "TFLite fp16/int8 quantization"),
}


def require(module: str) -> ModuleType:
    """Import an optional dependency, or raise MissingDependencyError saying how to install it."""
    from export.quiet import quiet

    try:
        with quiet():  # litert-torch, torchao and coremltools print notes at import (CUDA kernels, macOS-only libs)
            return importlib.import_module(module)
    except ImportError as e:
        package, purpose = OPTIONAL.get(module, (module, module))
        raise MissingDependencyError(
            f"{purpose} needs the package '{package.split('=')[0]}', which is not installed or does not import "
            f"({e.__class__.__name__}: {e}); install the export extra:  pip install 'retrieval-sdk[export]'  "
            f"(or just: pip install '{package}')"
        ) from None
