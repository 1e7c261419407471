"""torch embedding model -> TFLite with litert-torch (no TensorFlow): NHWC batch-1 float32 input `image`
(1, H, W, 3), float32 output `embedding` (1, D); fp16 weights and calibrated int8 with ai-edge-quantizer;
a structural check with ai-edge-litert. Standard TFLite metadata is written by export/tflite_support_env.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from export.calibration import percentile_range
from export.errors import ExportError, require
from export.quiet import quiet as _quiet
from sdk.backends import litert_interpreter

INPUT_NAME, OUTPUT_NAME = "image", "embedding"
SIGNATURE = "serving_default"
# Ops of the head's pooling and L2 normalisation (by the torch module scope litert-torch records in
# each op's name) stay float in int8 files, and the graph input/output stay float32, so every
# precision takes and returns the same tensors. The whitening FC / CGD projections are quantized.
_FLOAT_SCOPES = r"training\.pooling\.|training\.heads\.L2Norm|serving_default_embedding"


def _nhwc_wrapper(model):
    import torch

    class NHWCInput(torch.nn.Module):
        """image (1, H, W, 3) -> {"embedding": model(image as NCHW)}: mobile runtimes feed NHWC bitmaps."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image):
            return {OUTPUT_NAME: self.inner(image.permute(0, 3, 1, 2))}

    return NHWCInput(model).eval()


def export_tflite(model, path: str | Path, input_size: tuple[int, int] = (224, 224)) -> Path:
    """Convert `model` (NCHW in) to a float32 TFLite file with an NHWC batch-1 `image` input."""
    import torch

    litert_torch = require("litert_torch")
    litert_torch.config.show_progress = False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = input_size
    with _quiet():
        edge = litert_torch.convert(_nhwc_wrapper(model.eval()), sample_kwargs={INPUT_NAME: torch.zeros(1, h, w, 3)})
        edge.export(str(path))
    return path


def leading_conv_scopes(path: str | Path, n: int) -> list[str]:
    """Regexes matching the first `n` CONV_2D / DEPTHWISE_CONV_2D ops of a .tflite (execution order), by
    their op scope (output tensor names, as ai-edge-quantizer matches recipes against them)."""
    import re

    require("ai_edge_quantizer")
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    if n <= 0:
        return []
    model = tfl_flatbuffer_utils.read_model(str(path))
    sg = model.subgraphs[0]
    codes = [model.operatorCodes[o.opcodeIndex] for o in sg.operators]
    conv = {3, 4}  # BuiltinOperator CONV_2D, DEPTHWISE_CONV_2D
    scopes = []
    for op, code in zip(sg.operators, codes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) in conv:
            scopes.append("^" + re.escape(tfl_flatbuffer_utils.get_op_scope(op, sg.tensors)) + "$")
            if len(scopes) == n:
                break
    return scopes


def _recipe(kind: str, float_scopes: list[str] = ()):
    require("ai_edge_quantizer")
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe_manager

    ops, algos = qtyping.TFLOperationName, algorithm_manager.AlgorithmName
    rm = recipe_manager.RecipeManager()
    if kind == "int8":
        rm.add_static_config(".*", ops.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
        rm.add_quantization_config(_FLOAT_SCOPES, ops.ALL_SUPPORTED, algorithm_key=algos.NO_QUANTIZE)
        for scope in float_scopes:  # leading convs kept float (see export.onnx.quantize_int8)
            rm.add_quantization_config(scope, ops.ALL_SUPPORTED, algorithm_key=algos.NO_QUANTIZE)
    elif kind == "fp16":
        for op in (ops.FULLY_CONNECTED, ops.CONV_2D, ops.DEPTHWISE_CONV_2D):
            rm.add_weight_only_config(".*", op, num_bits=16, algorithm_key=algos.FLOAT_CASTING)
    else:
        raise ExportError(f"unknown TFLite quantization {kind!r}")
    # float32 graph input and output for every precision
    rm.add_quantization_config(".*", ops.INPUT, algorithm_key=algos.NO_QUANTIZE)
    rm.add_quantization_config(".*", ops.OUTPUT, algorithm_key=algos.NO_QUANTIZE)
    return rm.get_quantization_recipe()


def _keep_each_image(qsv: dict, new: dict) -> dict:
    """ai-edge-quantizer Calibrator update: the running min/max plus every image's own (the first
    image's QSV is stored without a call)."""
    if not qsv:
        return new
    return {"min": np.minimum(qsv["min"], new["min"]), "max": np.maximum(qsv["max"], new["max"]),
            "mins": qsv.get("mins", [qsv["min"]]) + [new["min"]],
            "maxs": qsv.get("maxs", [qsv["max"]]) + [new["max"]]}


def robust_ranges(qsvs: dict) -> dict:
    """Per-image ranges (from `_keep_each_image`) -> one range per tensor (export.calibration)."""
    return {name: dict(zip(("min", "max"), percentile_range(q["mins"], q["maxs"]))) if "mins" in q else q
            for name, q in qsvs.items()}


def quantize_int8(src: str | Path, dst: str | Path, calibration: np.ndarray, progress: str | None = None,
                  float_convs: int = 0) -> Path:
    """Static int8 (per-channel int8 weights, int8 activations with ranges from `calibration`, a float32
    NHWC batch of preprocessed real images, see export.calibration) with ai-edge-quantizer; float32 I/O kept.
    float_convs: keep the first N conv ops float (see export.onnx.quantize_int8). progress: the label of
    a bar that counts calibrated images (None: no bar); it writes to the terminal's stderr even though
    the quantizer's own output is muted."""
    require("ai_edge_quantizer")
    from ai_edge_quantizer import quantizer

    if calibration.ndim != 4 or calibration.shape[-1] != 3 or len(calibration) == 0:
        raise ExportError(f"TFLite int8 calibration needs a non-empty (N,H,W,3) batch, got {calibration.shape}")
    from tqdm.auto import tqdm

    samples = [{INPUT_NAME: np.ascontiguousarray(x[None], dtype=np.float32)} for x in calibration]
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w")  # still the terminal while _quiet() points fd 2 at /dev/null
    with terminal, _quiet(), tqdm(samples, desc=progress, unit="img", disable=progress is None, leave=True,
                                  file=terminal) as bar:
        qt = quantizer.Quantizer(str(src), _recipe("int8", leading_conv_scopes(src, float_convs)))
        from ai_edge_quantizer import calibrator

        calib = calibrator.Calibrator(Path(src).read_bytes(), num_threads=max(1, min(4, os.cpu_count() or 1)),
                                      qsv_update_func=_keep_each_image)
        for sample in bar:  # one image per call, so the bar moves as images are calibrated
            calib.calibrate({SIGNATURE: [sample]}, qt._recipe_manager)
        qt.quantize(robust_ranges(calib.get_model_qsvs()), enable_progress_report=False).export_model(
            str(dst), overwrite=True)
    inline_buffers(dst)
    return Path(dst)


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights (conv/FC), float32 compute and I/O: half the size, same speed on CPU (XNNPACK may
    run it in fp16 where the hardware has fp16 arithmetic; the GPU delegate does)."""
    require("ai_edge_quantizer")
    from ai_edge_quantizer import quantizer

    with _quiet():
        quantizer.Quantizer(str(src), _recipe("fp16")).quantize(enable_progress_report=False).export_model(
            str(dst), overwrite=True)
    inline_buffers(dst)
    return Path(dst)


def inline_buffers(path: str | Path) -> None:
    """Rewrite a quantized .tflite with short tensor names and every weight buffer inside the flatbuffer.
    ai-edge-quantizer stores buffers of models over 256 KB after the flatbuffer (offset/size fields, a 2023+
    schema feature): LiteRT reads that, but tflite-support's metadata writer drops such buffers and its Task
    Library runtime cannot load them. Files under 2 GB gain nothing from the external layout."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))  # resolves offset buffers into .data
    shorten_tensor_names(model)
    Path(path).write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))


def shorten_tensor_names(model) -> None:
    """Replace litert-torch's tensor names (the full torch module path of every fused op, ~700 bytes
    each, ~135 KB per MobileNetV2: debugging information) by short ones (t<index>), keeping the names
    of the signature's input and output. Done on the fp16/int8 files, which are converted from the
    fp32 file and never converted further; the fp32 file keeps its names because the quantization
    recipes select ops by them."""
    for sg in model.subgraphs:
        keep = set()
        for sig in model.signatureDefs or []:
            keep.update(t.tensorIndex for t in list(sig.inputs or []) + list(sig.outputs or []))
        keep.update(sg.inputs), keep.update(sg.outputs)
        for i, t in enumerate(sg.tensors):
            if i not in keep:
                t.name = f"t{i}"


def check_tflite(path: str | Path, embedding_dim: int | None = None,
                 input_size: tuple[int, int] | None = None) -> dict:
    """Structural check of the bundle contract: signature `serving_default` with float32 input `image`
    (1, H, W, 3) and float32 output `embedding` (1, D). Returns the facts."""
    interp = litert_interpreter(path, threads=1)
    sigs = interp.get_signature_list()
    problems = []
    if SIGNATURE not in sigs or sigs[SIGNATURE].get("inputs") != [INPUT_NAME] or \
            sigs[SIGNATURE].get("outputs") != [OUTPUT_NAME]:
        problems.append(f"signatures {sigs} (expected {SIGNATURE}: image -> embedding)")
    ins, outs = interp.get_input_details(), interp.get_output_details()
    facts = {"signatures": sigs}
    if len(ins) == 1 and len(outs) == 1:
        facts.update(input_shape=ins[0]["shape"].tolist(), output_shape=outs[0]["shape"].tolist(),
                     input_dtype=np.dtype(ins[0]["dtype"]).name, output_dtype=np.dtype(outs[0]["dtype"]).name)
        if facts["input_dtype"] != "float32" or facts["output_dtype"] != "float32":
            problems.append(f"I/O dtypes {facts['input_dtype']}/{facts['output_dtype']} (expected float32)")
        shape = facts["input_shape"]
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or (input_size and tuple(shape[1:3]) != tuple(input_size)):
            problems.append(f"input shape {shape} (expected [1, {input_size or 'H, W'}, 3])")
        if len(facts["output_shape"]) != 2 or (embedding_dim and facts["output_shape"][1] != embedding_dim):
            problems.append(f"output shape {facts['output_shape']} (expected [1, {embedding_dim or 'D'}])")
    else:
        problems.append(f"{len(ins)} inputs and {len(outs)} outputs (expected 1 and 1)")
    if problems:
        raise ExportError(f"{path} breaks the bundle's TFLite contract: " + "; ".join(problems) +
                          "; re-export it with `retrieval-sdk export --format tflite`")
    return facts

