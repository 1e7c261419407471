"""torch embedding model -> ONNX: opset 17, input `image` (N,3,H,W) float32 with dynamic batch,
height and width, output `embedding` (N,D) float32 L2-normalised."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "embedding"


def export_onnx(model: torch.nn.Module, path: str | Path, input_size: tuple[int, int] = (224, 224),
                opset: int = OPSET) -> Path:
    """Write `model` as ONNX at `path`; the trace size only seeds shapes (H, W stay dynamic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.randn(1, 3, *input_size)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript; it is
        # still the one that keeps GeM's spatial mean dynamic without extra packages.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path
