"""torch embedding model -> CoreML .mlpackage (ML program, iOS 16+) with coremltools.

- Input `image`: a float32 tensor (1, 3, H, W) normalised per the preprocessing spec, or (image_input=True)
  an ImageType that takes the camera bitmap: CoreML scales pixels by 1/value_range and the model's first
  op applies the spec's per-channel mean/std (ImageType's own bias/scale has one scale for all channels,
  which cannot express per-channel std exactly).
- Output `embedding`: float32 (1, D). With fp16 compute coremltools silently makes I/O fp16 unless
  told; we pin both to float32.
- Precision: fp32 (float32 compute), fp16 (float16 weights and compute; the head's pow/mean/norm ops
  stay float32), int8 (int8 per-channel symmetric weights, fp16 compute).
- User metadata: embedding dim, embedding-space id, preprocessing spec (JSON), precision.
Prediction needs macOS (Core ML framework) and runs through sdk.backends like every other file; on Linux
the file is validated structurally and an fp16 torch proxy (`proxy_model`) estimates the numerical
effect of the precision.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from export.errors import ExportError, require
from export.quiet import quiet
from sdk.preprocess import PreprocessSpec

INPUT_NAME, OUTPUT_NAME = "image", "embedding"
SPEC_VERSION_IOS16 = 7
# MIL op types kept float32 under fp16 compute: GeM's x**p and spatial mean, MAC, the L2 norms.
FP32_OPS = frozenset({"pow", "reduce_mean", "reduce_sum", "reduce_max", "reduce_l2_norm", "reduce_sum_square",
                      "sqrt", "rsqrt", "real_div", "l2_norm", "maximum"})


def _wrapper(model, spec: PreprocessSpec, image_input: bool):
    import torch

    class CoreMLInput(torch.nn.Module):
        """ImageType input arrives as pixels / value_range: apply the spec's per-channel mean/std first."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            order = [2, 1, 0] if spec.channel_order == "BGR" else [0, 1, 2]
            self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32)[order].view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32)[order].view(1, 3, 1, 1))

        def forward(self, image):
            return self.inner((image - self.mean) / self.std)

    return CoreMLInput(model).eval() if image_input else model.eval()


def export_coreml(model, path: str | Path, spec: PreprocessSpec, precision: str = "fp32",
                  image_input: bool = False, metadata: dict | None = None) -> Path:
    """Convert `model` to an .mlpackage at `path` (see the module docstring)."""
    import torch

    with quiet():  # coremltools prints import notes ("Failed to load _MLModelProxy" on Linux) and progress bars
        ct = require("coremltools")
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"CoreML precision must be fp32, fp16 or int8, got {precision!r}")
    path = Path(path)
    h, w = spec.input_size
    example = torch.zeros(1, 3, h, w)
    with quiet():
        traced = torch.jit.trace(_wrapper(model, spec, image_input), example)
        if image_input:
            layout = ct.colorlayout.BGR if spec.channel_order == "BGR" else ct.colorlayout.RGB
            inputs = [ct.ImageType(name=INPUT_NAME, shape=(1, 3, h, w), scale=1.0 / spec.value_range,
                                   bias=[0.0, 0.0, 0.0], color_layout=layout)]
        else:
            inputs = [ct.TensorType(name=INPUT_NAME, shape=(1, 3, h, w), dtype=np.float32)]
        compute = (ct.precision.FLOAT32 if precision == "fp32"
                   else ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type not in FP32_OPS))
        mlmodel = ct.convert(
            traced, inputs=inputs, outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
            convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16, compute_precision=compute,
        )
        if precision == "int8":
            from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

            config = OptimizationConfig(global_config=OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=512))
            mlmodel = linear_quantize_weights(mlmodel, config=config)
    mlmodel.author = "retrieval-sdk"
    mlmodel.short_description = "Image embedding model: L2-normalised float32 embedding, inner product = cosine."
    mlmodel.input_description[INPUT_NAME] = ("RGB image" if image_input else
                                             "float32 (1,3,H,W) image normalised per the preprocess metadata")
    mlmodel.output_description[OUTPUT_NAME] = "float32 (1,D) L2-normalised embedding"
    meta = {"precision": precision, "input_type": "image" if image_input else "tensor", **(metadata or {})}
    for key, value in meta.items():
        mlmodel.user_defined_metadata[key] = value if isinstance(value, str) else json.dumps(value)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    mlmodel.save(str(path))
    return path


def _weight_dtypes(spec) -> dict[str, int]:
    """How many weight tensors of each dtype the ML program holds (const ops, int8 for quantized ones)."""
    from coremltools.proto import MIL_pb2

    names = {v: k for k, v in MIL_pb2.DataType.items()}
    counts: dict[str, int] = {}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                if op.type == "const":
                    t = op.attributes["val"].type.tensorType
                    if t.rank >= 1 and np.prod([d.constant.size for d in t.dimensions]) >= 64:
                        key = names.get(t.dataType, str(t.dataType)).lower()
                        counts[key] = counts.get(key, 0) + 1
                elif op.type.startswith("constexpr_"):
                    for attr in ("quantized_data", "data"):
                        if attr in op.attributes:
                            key = names.get(op.attributes[attr].type.tensorType.dataType, "?").lower()
                            counts[key] = counts.get(key, 0) + 1
    return counts


def check_coreml(path: str | Path, embedding_dim: int | None = None, spec: PreprocessSpec | None = None,
                 precision: str | None = None, embedding_space: str | None = None) -> dict:
    """Structural validation (what can be checked without macOS): ML program for iOS 16+, input `image`
    (float32 (1,3,H,W) tensor or an H x W RGB/BGR image), output `embedding` float32 (1, D), weight dtypes
    matching the precision, and the user metadata (embedding dim, space id, preprocessing). Returns facts."""
    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ExportError(f"{path} is not an .mlpackage (no Manifest.json); re-export with --format coreml")
    with quiet():
        s = require("coremltools").models.MLModel(str(path), skip_model_load=True).get_spec()
    problems = []
    facts: dict = {"specification_version": s.specificationVersion, "type": s.WhichOneof("Type")}
    if facts["type"] != "mlProgram":
        problems.append(f"model type {facts['type']} (expected mlProgram)")
    if s.specificationVersion < SPEC_VERSION_IOS16:
        problems.append(f"specification version {s.specificationVersion} (< {SPEC_VERSION_IOS16}, iOS 16)")
    from coremltools.proto import FeatureTypes_pb2 as ft

    array_types = {v: k for k, v in ft.ArrayFeatureType.ArrayDataType.items()}
    ins, outs = list(s.description.input), list(s.description.output)
    if [i.name for i in ins] != [INPUT_NAME] or [o.name for o in outs] != [OUTPUT_NAME]:
        problems.append(f"inputs {[i.name for i in ins]} / outputs {[o.name for o in outs]} "
                        f"(expected ['{INPUT_NAME}'] / ['{OUTPUT_NAME}'])")
    else:
        kind = ins[0].type.WhichOneof("Type")
        if kind == "multiArrayType":
            a = ins[0].type.multiArrayType
            facts.update(input_type="tensor", input_shape=list(a.shape), input_dtype=array_types[a.dataType])
            if facts["input_dtype"] != "FLOAT32":
                problems.append(f"input dtype {facts['input_dtype']} (expected FLOAT32)")
            if spec and facts["input_shape"] != [1, 3, *spec.input_size]:
                problems.append(f"input shape {facts['input_shape']} (expected [1, 3, {spec.input_size[0]}, "
                                f"{spec.input_size[1]}])")
        elif kind == "imageType":
            im = ins[0].type.imageType
            color = ft.ImageFeatureType.ColorSpace.Name(im.colorSpace)
            facts.update(input_type="image", input_shape=[1, 3, im.height, im.width], input_color=color)
            if spec and ([im.height, im.width] != list(spec.input_size) or color != spec.channel_order):
                problems.append(f"image input {color} {im.height}x{im.width} (expected {spec.channel_order} "
                                f"{spec.input_size[0]}x{spec.input_size[1]})")
        else:
            problems.append(f"input type {kind} (expected a multiarray or an image)")
        o = outs[0].type.multiArrayType
        facts.update(output_shape=list(o.shape), output_dtype=array_types.get(o.dataType, "?"))
        if facts["output_dtype"] != "FLOAT32":
            problems.append(f"output dtype {facts['output_dtype']} (expected FLOAT32: fp16 compute must not "
                            "leak into the output)")
        if embedding_dim and facts["output_shape"] not in ([1, embedding_dim], []):
            problems.append(f"output shape {facts['output_shape']} (expected [1, {embedding_dim}])")
    meta = dict(s.description.metadata.userDefined)
    facts["metadata"] = meta
    for key in ("embedding_dim", "embedding_space", "preprocess", "precision"):
        if key not in meta:
            problems.append(f"user metadata lacks '{key}'")
    if embedding_dim and meta.get("embedding_dim") not in (None, str(embedding_dim)):
        problems.append(f"metadata embedding_dim {meta.get('embedding_dim')} (expected {embedding_dim})")
    if embedding_space and meta.get("embedding_space") not in (None, embedding_space):
        problems.append(f"metadata embedding_space {meta.get('embedding_space')} (expected {embedding_space})")
    if spec and "preprocess" in meta and PreprocessSpec.from_dict(json.loads(meta["preprocess"])) != spec:
        problems.append("metadata preprocess differs from the bundle's preprocessing spec")
    weights = _weight_dtypes(s)
    facts["weight_dtypes"] = weights
    expected = {"fp32": "float32", "fp16": "float16", "int8": "int8"}.get(precision or meta.get("precision", ""))
    if expected and (not weights or max(weights, key=weights.get) != expected):
        problems.append(f"weights are mostly {max(weights, key=weights.get) if weights else 'absent'} "
                        f"(expected {expected}; counts {weights})")
    if problems:
        raise ExportError(f"{path} breaks the bundle's CoreML contract: " + "; ".join(problems) +
                          "; re-export it with `retrieval-sdk export --format coreml`")
    return facts


def proxy_model(model, precision: str):
    """A torch stand-in for the CoreML file's numerics, runnable on Linux: fp16 -> backbone in float16,
    head float32 (as FP32_OPS keeps it); int8 -> additionally conv/linear weights rounded to int8
    per output channel (symmetric). fp32 -> the model itself. Returns a callable (NCHW tensor -> emb)."""
    import torch

    if precision == "fp32":
        return model
    proxy = copy.deepcopy(model).eval()
    if precision == "int8":
        with torch.no_grad():
            for m in proxy.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight.numel() >= 512:
                    wt = m.weight
                    scale = wt.abs().flatten(1).amax(1).clamp(min=1e-12) / 127.0
                    shape = (-1,) + (1,) * (wt.dim() - 1)
                    m.weight.copy_(torch.round(wt / scale.view(shape)).clamp(-127, 127) * scale.view(shape))
    proxy.backbone.half()

    def run(x):
        feats = proxy.backbone(x.half()).float()
        return proxy.norm(proxy.whiten(proxy.pool(feats)))

    return run
