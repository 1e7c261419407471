"""torch embedding model -> ONNX with torch's torch.export-based exporter (onnxscript): opset 18, input
`image` (N,3,H,W) float32 with dynamic batch, height and width, output `embedding` (N,D) float32
L2-normalised; plus fp16 conversion, int8 static QDQ quantization calibrated on real images, and a
structural check.

CNN backbones keep H and W dynamic (the poolings reduce over the spatial dims, no kernel size is baked
in). ViT backbones (gallery side) are exported at their spec size: timm resamples the positional
embedding with antialiased bicubic interpolation, which has no ONNX opset-18 equivalent, so the
embedding for the spec's grid is computed in torch and baked in (H, W fixed; batch stays dynamic).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from export.calibration import percentile_range
from export.errors import ExportError, require
from export.quiet import quiet

OPSET = 18  # the torch.export-based exporter's opset (onnxscript's torchlib)
INPUT_NAME, OUTPUT_NAME = "image", "embedding"
# The pooling and normalisation ops of the embedding head (GeM's clamp/x**p/mean/x**(1/p), SPoC, MAC,
# the L2 norms) stay float32 in fp16 files and unquantized in int8 files: they are a sliver of the
# compute, and reduced precision there costs cosine (and exact unit norm). Its matrix products
# (whitening FC, CGD projections) are converted/quantized like the backbone: they hold most weights.
HEAD_SCOPES = ("/pool/", "/norm/")
HEAD_MATMULS = ("MatMul", "Gemm", "Conv")


def head_nodes(graph) -> list[str]:
    """Names of the head's pooling/normalisation nodes (see HEAD_SCOPES)."""
    return [n.name for n in graph.node if n.name.startswith(HEAD_SCOPES) and n.op_type not in HEAD_MATMULS]


def _name_head_nodes(path: Path) -> None:
    """Prefix the head's node names with their module scope ('/pool/', '/norm/', from the `namespace` the
    exporter records per node, e.g. '.../pool: training.pooling.GeM/...'), then drop the per-node
    metadata (module paths and stack traces: ~190 KB for MobileNetV2, debugging information)."""
    onnx = require("onnx")
    model = onnx.load(str(path))
    for node in model.graph.node:
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        scope = next((s for s in HEAD_SCOPES if f"/{s.strip('/')}: " in namespace), "")
        node.name = scope + node.name
        del node.metadata_props[:]
    onnx.save(model, str(path))


def export_onnx(model, path: str | Path, input_size: tuple[int, int] = (224, 224), opset: int = OPSET,
                metadata: dict | None = None) -> Path:
    """Write `model` as ONNX at `path`; the trace size only seeds shapes (H, W stay dynamic for CNNs)."""
    import torch

    require("onnx"), require("onnxscript")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: use opset >= 17")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.randn(2, 3, *input_size)  # batch 2: torch.export specialises a size-1 dim to a constant
    vit = _is_vit(model)
    dims = {0: torch.export.Dim("batch", max=4096)}
    if dynamic_hw(model):
        dims.update({2: torch.export.Dim("height", min=16, max=4096), 3: torch.export.Dim("width", min=16, max=4096)})
    with (_baked_vit_pos_embed(model, example) if vit else contextlib.nullcontext()), quiet():
        # torch.export-based exporter (onnxscript); `quiet` drops its progress lines and warnings
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=True, dynamic_shapes=(dims,), verbose=False)
    _name_head_nodes(path)
    if metadata:
        add_metadata(path, metadata)
    return path


def dynamic_hw(model) -> bool:
    """Whether the exported graph keeps H and W dynamic: CNN models do; ViTs (baked positional
    embedding) and models that say `dynamic_hw = False` (the AFF gallery) take the trace size."""
    return not _is_vit(model) and getattr(model, "dynamic_hw", True)


def _is_vit(model) -> bool:
    backbone = getattr(model, "backbone", None)
    return getattr(getattr(backbone, "config", None), "kind", "cnn") == "vit"


@contextlib.contextmanager
def _baked_vit_pos_embed(model, example):
    """During tracing, timm's positional-embedding resampling returns the embedding computed eagerly
    (antialiased bicubic, as in torch) for the example's grid: exact at that size, fixed H/W."""
    import torch

    vt = sys.modules["timm.models.vision_transformer"]
    original = vt.resample_abs_pos_embed
    cache: dict = {}

    def recording(posemb, new_size, **kw):
        out = original(posemb, new_size=new_size, **kw)
        cache[(int(new_size[0]), int(new_size[1]))] = out.detach().clone()
        return out

    def baked(posemb, new_size, **kw):
        return cache[(int(new_size[0]), int(new_size[1]))]

    vt.resample_abs_pos_embed = recording
    try:
        with torch.no_grad():
            model(example)
        vt.resample_abs_pos_embed = baked
        yield
    finally:
        vt.resample_abs_pos_embed = original


def add_metadata(path: str | Path, metadata: dict) -> None:
    """Store key/value strings in the ONNX file's metadata_props (dicts/lists as JSON)."""
    onnx = require("onnx")
    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            model.metadata_props.add(key=key, value=text)
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    onnx = require("onnx")
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and compute, float32 `image`/`embedding` I/O (Cast nodes at the edges); the
    embedding head stays float32. For GPU / NNAPI / CoreML execution providers: onnxruntime's CPU
    provider runs many fp16 ops through casts and is slower than fp32 there."""
    onnx = require("onnx")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    keep = head_nodes(model.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    _toposort(half.graph)
    onnx.save(half, str(dst))
    return Path(dst)


def _toposort(graph) -> None:
    """Reorder nodes so each comes after its inputs' producers (the fp16 converter appends its I/O
    casts at the end, which onnx.checker rejects)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("ONNX graph has a cycle or a dangling input; cannot sort it")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def quantize_int8(src: str | Path, dst: str | Path, calibration: np.ndarray, per_channel: bool = True,
                  batch_size: int = 8, progress: str | None = None, float_convs: int = 0) -> Path:
    """Static int8 QDQ quantization (int8 per-channel weights, uint8 activations) calibrated on `calibration`,
    a float32 NCHW batch of preprocessed real images (`progress`: the calibration bar's label, None for no bar):
    each activation's range comes from the images' own ranges (`per_image_ranges`, export.calibration's rule,
    as for TFLite), handed to onnxruntime as a TensorQuantOverrides rmin/rmax. The model goes through
    `quant_pre_process` (shape inference + graph optimization) first; the pooling and L2-norm head stays
    float so the output is exactly unit-norm.

    float_convs: keep the first N Conv nodes (in execution order) float. ImageNet MobileNetV2 weights
    with BatchNorm folded in have early layers whose per-channel weight ranges span 1e-5..1e2: a
    per-tensor uint8 activation feeding them loses the small channels, and the big weights amplify
    that error (the case cross-layer equalization was invented for). Those layers hold a few thousand
    weights, so keeping them float costs nothing in size. Only a leading run is excluded: onnxruntime
    1.32's graph optimizer mis-handles a float Conv fed by a quantized one (min cosine < 0)."""
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration.ndim != 4 or len(calibration) == 0:
        raise ExportError(f"int8 calibration needs a non-empty (N,3,H,W) batch, got shape {calibration.shape}")
    src, dst = Path(src).resolve(), Path(dst).resolve()
    with tempfile.TemporaryDirectory(prefix="retrieval-sdk-quant-") as tmp, working_directory(tmp):
        pre = Path(tmp) / "pre.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                quant_pre_process(str(src), str(pre))
            except Exception:  # noqa: BLE001  symbolic shape inference gives up on some graphs; ONNX's own suffices
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        ranges = per_image_ranges(pre, calibration, Path(tmp) / "augmented.onnx", progress=progress)
        graph = onnx.load(str(pre)).graph
        exclude = head_nodes(graph) + [n.name for n in graph.node if n.op_type == "Conv"][:float_convs]
        # onnxruntime still runs its own MinMax pass; every tensor it calibrates gets our range instead.
        # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops each full buffer without
        # computing its ranges (microsoft/onnxruntime#18893), so only the last partial batch counts.
        quantize_static(
            str(pre), str(dst), _Batches(calibration, batch_size), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
            extra_options={"TensorQuantOverrides": {name: [{"rmin": lo, "rmax": hi}]
                                                    for name, (lo, hi) in ranges.items()}},
        )
    # quant_pre_process drops metadata_props: carry them over
    meta = read_metadata(src)
    if meta:
        add_metadata(dst, meta)
    return Path(dst)


class _Batches:
    """A calibration data reader for onnxruntime (it takes any object with get_next, see
    CalibrationDataReader.__subclasshook__): a float32 NCHW array, `batch_size` images at a time."""

    def __init__(self, images: np.ndarray, batch_size: int):
        self.images, self.batch_size, self.start = images, batch_size, 0

    def get_next(self):
        chunk = self.images[self.start:self.start + self.batch_size]
        self.start += self.batch_size
        return {INPUT_NAME: np.ascontiguousarray(chunk, dtype=np.float32)} if len(chunk) else None


def per_image_ranges(model: str | Path, calibration: np.ndarray, augmented: str | Path,
                     progress: str | None = None) -> dict[str, tuple[np.float32, np.float32]]:
    """Every float tensor of `model` -> its int8 range over `calibration` by export.calibration's rule,
    from each image's own min/max (onnxruntime's MinMax calibrator run one image at a time)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator
    from tqdm.auto import tqdm

    calibrator = create_calibrator(str(model), augmented_model_path=str(augmented),
                                   calibrate_method=CalibrationMethod.MinMax)
    mins, maxs = {}, {}  # tensor name -> one min (max) per image
    for image in tqdm(calibration, desc=progress, unit="img", disable=progress is None, leave=True):
        calibrator.calibrate_tensors_range = None  # forget the previous image
        calibrator.collect_data(_Batches(image[None], 1))
        for name, data in calibrator.compute_data().items():
            mins.setdefault(name, []).append(data.range_value[0])
            maxs.setdefault(name, []).append(data.range_value[1])
    return {name: tuple(np.float32(v) for v in percentile_range(mins[name], maxs[name])) for name in mins}


@contextlib.contextmanager
def working_directory(path: str | Path):
    """Run a block with `path` as the current directory. onnxruntime's symbolic shape inference, when it
    gives up on a graph (it does on GeM's dynamic spatial mean), saves `sym_shape_infer_temp.onnx` and a
    `<uuid1>.data` external-data file into the *current* directory before raising; quant_pre_process
    catches that and goes on, so without this the export would litter the user's working directory."""
    import os

    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def check_onnx(path: str | Path, embedding_dim: int | None = None, dynamic_hw: bool = True) -> dict:
    """Structural check of the bundle contract: opset >= 17, one float32 input `image` (batch, 3, H, W)
    with dynamic batch (and H, W for CNNs), one float32 output `embedding` (batch, D). Returns the facts."""
    onnx = require("onnx")
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path} is not a valid ONNX model: {e}") from None
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    problems = []
    if opset < 17:
        problems.append(f"opset {opset} < 17")

    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outputs = list(model.graph.output)
    if [i.name for i in inputs] != [INPUT_NAME]:
        problems.append(f"inputs {[i.name for i in inputs]} (expected ['{INPUT_NAME}'])")
    if [o.name for o in outputs] != [OUTPUT_NAME]:
        problems.append(f"outputs {[o.name for o in outputs]} (expected ['{OUTPUT_NAME}'])")
    facts = {"opset": opset}
    if inputs and outputs:
        in_dims, out_dims = dims(inputs[0]), dims(outputs[0])
        facts.update(input_shape=in_dims, output_shape=out_dims,
                     input_dtype=onnx.TensorProto.DataType.Name(inputs[0].type.tensor_type.elem_type),
                     output_dtype=onnx.TensorProto.DataType.Name(outputs[0].type.tensor_type.elem_type))
        if facts["input_dtype"] != "FLOAT" or facts["output_dtype"] != "FLOAT":
            problems.append(f"I/O dtypes {facts['input_dtype']}/{facts['output_dtype']} (expected FLOAT)")
        if len(in_dims) != 4 or in_dims[1] != 3 or not isinstance(in_dims[0], str):
            problems.append(f"input shape {in_dims} (expected [batch, 3, H, W] with a dynamic batch)")
        elif dynamic_hw and not (isinstance(in_dims[2], str) and isinstance(in_dims[3], str)):
            problems.append(f"input shape {in_dims}: height and width are not dynamic")
        if len(out_dims) != 2 or (embedding_dim and out_dims[1] != embedding_dim):
            problems.append(f"output shape {out_dims} (expected [batch, {embedding_dim or 'D'}])")
    if problems:
        raise ExportError(f"{path} breaks the bundle's ONNX contract: " + "; ".join(problems) +
                          "; re-export it with `retrieval-sdk export`")
    return facts
