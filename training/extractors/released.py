"""Load released DELG / DOLG / CVNet checkpoints by mapping their key layout onto ours.

The public PyTorch releases build their ResNet with pycls (`stem.conv`, `s1.b1.f.a`, `s1.b1.proj`, ...);
our backbones are timm ResNets (`conv1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...). The block
structure is the same (bottleneck, stride on the 3x3 conv, BN eps 1e-5), so the mapping is a renaming:

    stem.conv / stem.bn           -> conv1 / bn1
    sI.bJ.f.a, f.a_bn             -> layerI.(J-1).conv1, bn1   (f.b -> conv2/bn2, f.c -> conv3/bn3)
    sI.bJ.proj, sI.bJ.bn          -> layerI.(J-1).downsample.0, downsample.1

Layouts (the head names of each release; every source tensor must be used or explicitly ignored,
every target tensor filled or explicitly absent from the release, shapes equal, or it is an error):
- "cvnet"  (github.com/sungonce/CVNet, CVNet_Rerank): encoder_q.<resnet>, encoder_q.head.pool.p,
  encoder_q.head.fc -> CVNetGlobal; the re-ranking modules (conv2ds, cv_learner) are ignored.
  Config: kind="cvnet", backbone="resnet50"/"resnet101", dim=2048.
- "dolg-pytorch" (github.com/feymanpriv/DOLG): globalmodel.<resnet>, pool_g, fc_t, fc, localmodel.{conv1,
  bn, conv2[, aspp]}, desc_cls (ArcFace) -> DOLG. Config: kind="dolg", local_dim=1024, dim=512,
  multi_atrous as trained (the port ships with the ASPP block commented out: multi_atrous=False).
- "delg-pytorch" (github.com/feymanpriv/DELG): globalmodel.<resnet>, globalmodel.head.{pool,fc},
  localmodel.{conv1,bn,conv2} (attention), desc_cls, att_cls -> DELG global head and attention. This port
  has no autoencoder: load with num_local=0 (global only) or train the autoencoder afterwards.
Classifier weights (ArcFace, attention classifier) load when the extractor has a head of the same shape
and are skipped otherwise (a different label set). Not verified against the actual release files (none
can be downloaded here); the mapping is tested by round trip on the real ResNet-50/101 layouts (the
inverse mapping lives with the tests, tests/training/test_extractors.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.checkpoint import read_state_dict_file
from training.extractors.base import ExtractorError, GalleryExtractor

BACKBONE = "trunk.backbone.model."
_PYCLS_PARTS = {"f.a": "conv1", "f.a_bn": "bn1", "f.b": "conv2", "f.b_bn": "bn2", "f.c": "conv3", "f.c_bn": "bn3",
                "proj": "downsample.0", "bn": "downsample.1"}
_PYCLS_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(f\.a_bn|f\.b_bn|f\.c_bn|f\.a|f\.b|f\.c|proj|bn)\.(\w+)$")
CLASSIFIERS = ("arcface.", "attention_classifier.")


@dataclass(frozen=True)
class ReleasedLayout:
    """Source-prefix -> target-prefix rules (first match wins; target BACKBONE means a pycls ResNet)."""

    kind: str
    rules: tuple[tuple[str, str], ...]
    ignore: tuple[str, ...] = ()  # source keys we deliberately leave out
    absent: tuple[str, ...] = ()  # target keys the release does not have
    note: str = ""


RELEASED_LAYOUTS: dict[str, ReleasedLayout] = {
    "cvnet": ReleasedLayout(
        "cvnet",
        rules=(("encoder_q.head.", "head."), ("encoder_q.", BACKBONE)),
        ignore=("conv2ds.", "cv_learner."),
    ),
    "dolg-pytorch": ReleasedLayout(
        "dolg",
        rules=(("globalmodel.", BACKBONE), ("pool_g.", "pool_g."), ("fc_t.", "fc_t."), ("fc.", "fc."),
               ("localmodel.", "localmodel."), ("desc_cls.weight", "arcface.weight")),
        ignore=("desc_cls.t", "globalmodel.head."),
    ),
    "delg-pytorch": ReleasedLayout(
        "delg",
        rules=(("globalmodel.head.pool.", "pool."), ("globalmodel.head.fc.", "whiten.fc."), ("globalmodel.", BACKBONE),
               ("localmodel.", "attention."), ("desc_cls.weight", "arcface.weight"),
               ("att_cls.fc.", "attention_classifier.")),
        ignore=("desc_cls.t",),
        absent=("autoencoder.",),
        note="the DELG PyTorch port has no autoencoder, so it gives no local descriptors",
    ),
}


@dataclass
class LoadReport:
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)  # source keys not used, by design
    skipped_classifiers: list[str] = field(default_factory=list)  # heads of another label set
    absent: list[str] = field(default_factory=list)  # our tensors the release does not have (left as they were)


def pycls_to_timm(key: str) -> str | None:
    """A pycls ResNet key in timm naming, or None when it is not a backbone key."""
    for src, dst in (("stem.conv.", "conv1."), ("stem.bn.", "bn1.")):
        if key.startswith(src):
            return dst + key[len(src):]
    m = _PYCLS_BLOCK.match(key)
    if m is None:
        return None
    stage, block, part, leaf = m.groups()
    return f"layer{stage}.{int(block) - 1}.{_PYCLS_PARTS[part]}.{leaf}"


def _map_key(key: str, layout: ReleasedLayout) -> str | None:
    for src, dst in layout.rules:
        if key.startswith(src):
            rest = key[len(src):]
            if dst == BACKBONE:
                mapped = pycls_to_timm(rest)
                return None if mapped is None else BACKBONE + mapped
            return dst + rest
    return None


def load_released(extractor: GalleryExtractor, path: str | Path, layout: str) -> LoadReport:
    """Fill `extractor` from a released checkpoint in `layout` (see RELEASED_LAYOUTS); strict but explained."""
    if layout not in RELEASED_LAYOUTS:
        raise ExtractorError(f"unknown released layout {layout!r}; choose one of {sorted(RELEASED_LAYOUTS)}")
    spec = RELEASED_LAYOUTS[layout]
    if extractor.config.kind != spec.kind:
        raise ExtractorError(f"layout {layout!r} holds a {spec.kind} model but the extractor is {extractor.config.kind}")
    if not extractor.trunk.backbone.config.timm_name.startswith("resnet"):
        raise ExtractorError(f"released {spec.kind} checkpoints use a ResNet backbone; the extractor uses "
                             f"'{extractor.config.backbone}' (set backbone resnet50 or resnet101)")
    if spec.absent and extractor.num_local:
        raise ExtractorError(f"{path}: {spec.note}; set num_local=0 to load it as a global extractor")
    source = read_state_dict_file(path, ExtractorError, "released checkpoint")
    target = extractor.state_dict()
    report = LoadReport()
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in source.items():
        new = _map_key(key, spec)
        if key.startswith(spec.ignore):
            report.ignored.append(key)
        elif new in target:
            mapped[new] = value
        elif new is not None and new.startswith(CLASSIFIERS):
            report.skipped_classifiers.append(key)  # the extractor has no such head
        else:
            unexpected.append(key)
    if unexpected:
        raise ExtractorError(
            f"{path} is not a {layout} checkpoint for this architecture: {len(unexpected)} tensors have no place "
            f"(e.g. {unexpected[0]}); check kind, backbone depth (resnet50/101) and multi_atrous"
        )
    for key in list(mapped):
        if mapped[key].shape != target[key].shape:
            if key.startswith(CLASSIFIERS):
                report.skipped_classifiers.append(key)
                del mapped[key]
                continue
            raise ExtractorError(
                f"{path}: {key} has shape {tuple(mapped[key].shape)} in the checkpoint but {tuple(target[key].shape)} "
                f"here; set the extractor's dim/local_dim/backbone to what the release was trained with"
            )
    missing = [k for k in target if k not in mapped and not k.startswith(CLASSIFIERS)
               and not k.endswith("num_batches_tracked")]  # older checkpoints lack the BN step counter
    report.absent = [k for k in missing if k.startswith(spec.absent)]
    missing = [k for k in missing if not k.startswith(spec.absent)]
    if missing:
        raise ExtractorError(
            f"{path} lacks {len(missing)} tensors of this {spec.kind} model (e.g. {missing[0]}); it is another "
            "architecture or depth"
        )
    extractor.load_state_dict(mapped, strict=False)
    report.loaded = len(mapped)
    extractor.weights_source = f"released {layout} checkpoint {path}"
    return report
