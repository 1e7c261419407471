"""`retrieval-sdk train cgd`: supervised training of an embedding model with the Combined Global Descriptor
head (Jun et al. 2019, arXiv:1903.10663) on a labelled set, on the one training loop, with its descriptor
ablation in one table.

The recipe: a registry backbone (optionally with its last downsampling removed, `last_stride=1`) ->
CGDHead (one SPoC/MAC/GeM branch per letter of `descriptors`, FC + L2 each, concatenated + L2); batch-hard
triplet loss on the combined descriptor plus label-smoothed, temperature-scaled cross-entropy of the
auxiliary classifier on the first branch; P x K class-balanced batches; augmentation, Adam, the cosine
schedule, `--device` and exact resume from `training.fit`. Each descriptor configuration is trained from
the same seed on the same batches, and is evaluated, with the pretrained backbone + plain GeM as the
baseline, by leave-one-out Recall@1/2/4/8 and mAP on the held-out split. The models are EmbeddingModels
(`model.safetensors`, `model_<D>.safetensors`): a quickstart gallery, an AFF/distillation teacher or a
phone query model, exportable with `retrieval-sdk export`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.config import Checked, ConfigError, RunConfig
from training.checkpoint import CheckpointMeta, save_checkpoint
from training.data import ImageDataset, LabelledImages, load_splits
from training.embed import embed_images
from training.evaluate import format_table, labelled_eval
from training.extractors.base import Trunk
from training.fit import FitConfig, OptimConfig, fit
from training.heads import CGDHead, check_gd_config
from training.losses import batch_hard_triplet_loss, label_smoothing_cross_entropy
from training.models import EmbeddingModel, ModelConfig, new_space_id
from training.samplers import SMALL_CLASSES, PKSampler
from training.transforms import eval_transform, train_transform

Log = Callable[[str], None]


@dataclass(frozen=True)
class CGDModelConfig(Checked):
    """Backbone and head. `descriptors` is the main run's configuration (S SPoC, M MAC, G GeM; the first
    letter feeds the auxiliary classifier), `dim` the total embedding dim, split evenly over the branches."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool | str = True
    image_size: int | None = 96
    last_stride: int = 1  # 1: the last downsampling removed, as the paper does with ResNet-50
    descriptors: str = "SG"
    dim: int = 512
    gem_p: float = 3.0
    head_init: str = "pca"  # pca: each branch FC starts as PCA of its pretrained pooled descriptors | random
    _where = "model"
    _checks = {"head_init": ("pca", "random"), "last_stride": (1, 2)}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_gd_config(self.descriptors, self.dim)


@dataclass(frozen=True)
class CGDLossConfig(Checked):
    """The paper's terms: triplet margin 0.1 on the combined descriptor; label smoothing 0.1 and temperature
    0.5 on the auxiliary classifier's softmax."""

    margin: float = 0.1
    smoothing: float = 0.1
    temperature: float = 0.5
    triplet_weight: float = 1.0
    classification_weight: float = 1.0
    _where = "loss"
    _checks = {"margin triplet_weight classification_weight": ">= 0", "smoothing": "[0, 1)", "temperature": "> 0"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.triplet_weight or self.classification_weight):
            raise ConfigError("loss.triplet_weight and loss.classification_weight cannot both be 0")


@dataclass(frozen=True)
class SamplerConfig(Checked):
    """P classes x K images per batch; `small_classes` says what a class with fewer than K images does
    (error | repeat | drop, see training.samplers.PKSampler); `batches` per epoch (None: images / (P K))."""

    p: int = 16
    k: int = 4
    small_classes: str = "error"
    batches: int | None = None
    _where = "sampler"
    _checks = {"p k": ">= 2", "small_classes": SMALL_CLASSES}


@dataclass(frozen=True)
class CGDTrainConfig(Checked):
    """Adam with the cosine schedule at the paper's lr 1e-4 (its batch is 128 at 224 px on a GPU); the head
    learns `head_lr_scale` times faster (1: a PCA-initialised head needs no catching up).
    `freeze_stem` keeps the backbone below its last stride-16 stage fixed (the paper trains it all): no
    backward pass there, about 2x faster on a CPU, and kinder to the pretrained weights on small sets."""

    epochs: int = 6
    lr: float = 1e-4
    head_lr_scale: float = 1.0
    freeze_stem: bool = True
    weight_decay: float = 1e-4
    augment: bool = True
    grad_clip: float | None = 10.0
    max_steps: int | None = None  # per epoch (tests, smoke runs)
    _where = "train"
    _checks = {"epochs": ">= 1", "lr head_lr_scale": "> 0"}


@dataclass(frozen=True)
class CGDEvalConfig:
    """Leave-one-out Recall@k and mAP on the held-out split; `baseline`: also the pretrained backbone +
    plain GeM (no FC, no training)."""

    ks: tuple[int, ...] = (1, 2, 4, 8)
    baseline: bool = True
    batch_size: int = 64


@dataclass(frozen=True)
class CGDConfig(RunConfig, run="cgd"):
    """One `train cgd` run: the main descriptor configuration plus `ablations` (more configurations,
    trained the same way), all in one table."""

    model: CGDModelConfig = field(default_factory=CGDModelConfig)
    loss: CGDLossConfig = field(default_factory=CGDLossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: CGDTrainConfig = field(default_factory=CGDTrainConfig)
    eval: CGDEvalConfig = field(default_factory=CGDEvalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for d in self.ablations:
            check_gd_config(d, self.model.dim)

    @property
    def descriptor_configs(self) -> list[str]:
        """The main configuration first, then each ablation once."""
        return list(dict.fromkeys((self.model.descriptors, *self.ablations)))


load_cgd_config = CGDConfig.load


# ------------------------------------------------------------------------------------------------ data


def load_data(cfg: CGDConfig):
    """The training and held-out splits of `cfg.data` (training.data.load_splits), with the sampler's checks
    run on the training labels before any model is built."""
    splits = load_splits(cfg)
    PKSampler(splits.train.labels, **asdict(cfg.sampler))
    return splits


# ------------------------------------------------------------------------------------------------ model


def build_model(cfg: CGDConfig, descriptors: str) -> EmbeddingModel:
    """The registry backbone + CGD head for `descriptors` (no classifier yet)."""
    m = cfg.model
    return EmbeddingModel(ModelConfig(m.backbone, "cgd", embedding_dim=m.dim, gem_p=m.gem_p, cgd_config=descriptors,
                                      input_size=m.image_size, last_stride=m.last_stride), pretrained=m.pretrained)


def cgd_losses(head: CGDHead, feature_map: torch.Tensor, labels: torch.Tensor, cfg: CGDLossConfig) -> dict:
    """The two CGD terms on one batch: batch-hard triplet on the combined descriptor, smoothed and
    temperature-scaled cross-entropy on the first branch's classifier."""
    embedding, logits = head.forward_train(feature_map)
    terms = {"triplet": batch_hard_triplet_loss(embedding, labels, cfg.margin),
             "ce": label_smoothing_cross_entropy(logits, labels, cfg.smoothing, cfg.temperature)}
    terms["loss"] = cfg.triplet_weight * terms["triplet"] + cfg.classification_weight * terms["ce"]
    return terms


def run_key(cfg: CGDConfig, descriptors: str, data: LabelledImages) -> str:
    """What one configuration's training is: everything but the other rows (`ablations`, the main `descriptors`),
    evaluation and naming, so a row trained by another command in the same `out` resumes (and is not redone)."""
    d = cfg.to_dict()
    for k in ("name", "out", "eval", "ablations"):
        d.pop(k)
    d["model"].pop("descriptors")
    return json.dumps([d, descriptors, len(data), len(data.classes)], sort_keys=True)


@torch.no_grad()
def init_projections_pca(model: EmbeddingModel, images: Sequence, power: float = 0.25, progress: bool = True) -> None:
    """Start each branch's FC (no bias) as the top principal directions of its pretrained pooled descriptors
    on `images` (uncentred, square-rooted whitening: power 0.25, eigenvalues floored at 1e-3 of the largest),
    so training starts near a PCA-whitened baseline instead of a random projection. Rows past the data's
    rank keep their random init."""
    head: CGDHead = model.pool
    model.eval()  # BatchNorm in inference mode: the pretrained statistics

    def pooled(x: torch.Tensor) -> torch.Tensor:
        fmap = model.backbone(x)
        return torch.cat([pool(fmap) for pool in head.poolings], dim=1)

    feats = embed_images(pooled, images, model.spec, desc="CGD head init (PCA)", progress=progress)
    c = head.in_channels
    for i, fc in enumerate(head.projections):
        x = feats[:, i * c:(i + 1) * c].astype(np.float64) / np.sqrt(len(feats))
        _, sv, vt = np.linalg.svd(x, full_matrices=False)
        eig = np.maximum(sv ** 2, 1e-3 * sv[0] ** 2)
        k = min(fc.out_features, len(sv))
        fc.weight[:k] = torch.from_numpy((vt[:k] * eig[:k, None] ** -power).astype(np.float32))


def train_cgd(cfg: CGDConfig, descriptors: str, data: LabelledImages, device: str = "cpu", progress: bool = True,
              log: Log | None = print) -> tuple[EmbeddingModel, list[dict]]:
    """Train one descriptor configuration on `data` (checkpointed under out/runs/<D>, resumed when there)."""
    torch.manual_seed(cfg.seed)
    sampler = PKSampler(data.labels, **asdict(cfg.sampler), seed=cfg.seed)
    if log and (sampler.repeated or sampler.dropped):
        log(f"  P x K: {len(sampler.repeated)} classes with < K={cfg.sampler.k} images drawn with repeats, "
            f"{len(sampler.dropped)} left out")
    model = build_model(cfg, descriptors)
    head: CGDHead = model.pool
    run_dir = Path(cfg.out) / "runs" / descriptors
    if cfg.model.head_init == "pca" and not (run_dir / "last.pt").is_file():  # a resumed run loads its weights
        init_projections_pca(model, data.paths, progress=progress)
    head.set_classes(len(data.classes))
    t = cfg.train
    transform = train_transform(model.spec, seed=cfg.seed) if t.augment else eval_transform(model.spec)
    loader = DataLoader(ImageDataset(data, transform), batch_sampler=sampler)
    trunk = Trunk(model.backbone).set_freeze_stem(True) if t.freeze_stem else None  # the one stem/tail split
    ids = {id(p) for p in model.backbone.parameters()}
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": t.lr},
              {"params": [p for p in model.parameters() if id(p) not in ids], "lr": t.lr * t.head_lr_scale}]

    def modes(epoch: int) -> None:
        model.train()
        if trunk is not None:
            trunk.train()  # the frozen stem's BatchNorm statistics stay fixed
    key = run_key(cfg, descriptors, data)
    history = fit(lambda b: cgd_losses(head, model.backbone(b[0]), b[1], cfg.loss), loader, {"model": model}, groups,
                  OptimConfig("adam", weight_decay=t.weight_decay),
                  FitConfig(epochs=t.epochs, max_steps=t.max_steps, device=device, grad_clip=t.grad_clip,
                            seed=cfg.seed, channels_last=True, checkpoint_dir=run_dir,
                            run_key=key, desc=f"cgd {descriptors}", progress=progress), on_epoch_start=modes, log=log)
    if trunk is not None:
        trunk.set_freeze_stem(False)
    head.set_classes(None)  # the classifier was for training: the saved model is the embedding alone
    return model.cpu().eval(), history


# ------------------------------------------------------------------------------------------------ eval


def evaluate(model: EmbeddingModel, data: LabelledImages, cfg: CGDEvalConfig, progress: bool = True,
             desc: str = "evaluation") -> dict:
    """Leave-one-out Recall@k and mAP of `model` on `data` (every image queries all the others)."""
    emb = embed_images(model, data.paths, model.spec, batch_size=cfg.batch_size, desc=desc, progress=progress)
    labels = np.asarray(data.labels)
    r = labelled_eval(emb, labels, emb, labels, ks=cfg.ks, exclude_self=True)
    return {"map": r.map, **{f"recall@{k}": v for k, v in r.recall.items()}, "dim": int(emb.shape[1]),
            "queries": r.n_evaluated}


def table(rows: list[dict], ks: Sequence[int]) -> str:
    """One line per model: R@k and mAP (in %), its dim, and the training time (`resumed`: trained by an
    earlier command into the same out) and final loss."""
    columns = [(f"recall@{k}", f"R@{k}", 8, ".2f", 100) for k in ks] + [
        ("map", "mAP", 8, ".2f", 100), ("dim", "dim", 6, "d", 1), ("seconds", "train s", 9, ".0f", 1),
        ("final_loss", "loss", 8, ".3f", 1)]
    return format_table(rows, columns, "model", 28)


# ------------------------------------------------------------------------------------------------ the run


def run_cgd(cfg: CGDConfig, device: str = "cpu", progress: bool = True, log: Log | None = print) -> dict:
    """The whole run (see the module docstring); returns what results.json holds."""
    log = log or (lambda _: None)
    t0 = time.perf_counter()
    out = cfg.start(device)
    splits = load_data(cfg)
    log(splits.description)
    m = cfg.model
    log(f"model: {m.backbone} (last stride {m.last_stride}) + CGD -> {m.dim}-d at {m.image_size} px; "
        f"P x K = {cfg.sampler.p} x {cfg.sampler.k}, {cfg.train.epochs} epochs; descriptor configurations "
        f"{', '.join(cfg.descriptor_configs)}")
    rows = []
    if cfg.eval.baseline:  # untrained: the same pretrained backbone (same input size and stride) + plain GeM
        baseline = EmbeddingModel(ModelConfig(m.backbone, "gem", gem_p=m.gem_p, input_size=m.image_size,
                                              last_stride=m.last_stride), pretrained=m.pretrained)
        row = {"run": "pretrained + GeM (no training)", **evaluate(baseline, splits.eval, cfg.eval, progress,
                                                                      "baseline (eval)")}
        rows.append(row)
        log(f"baseline: R@1 {row['recall@1'] * 100:.2f}, mAP {row['map'] * 100:.2f} "
            f"(weights: {baseline.backbone.weights_source})")
    for d in cfg.descriptor_configs:
        start, resumed = time.perf_counter(), (out / "runs" / d / "last.pt").is_file()
        model, history = train_cgd(cfg, d, splits.train, device, progress, log)
        seconds = time.perf_counter() - start
        row = {"run": f"CGD {d}", "descriptors": d, **evaluate(model, splits.eval, cfg.eval, progress, f"{d} (eval)"),
               "seconds": seconds, "resumed": resumed, "final_loss": history[-1]["loss"] if history else None}
        file = out / ("model.safetensors" if d == m.descriptors else f"model_{d}.safetensors")
        save_checkpoint(model, file, CheckpointMeta(embedding_space=new_space_id("cgd"), role="gallery",
                                                    name=f"cgd-{d}", extra={k: v for k, v in row.items()
                                                                            if k not in ("run", "descriptors")}))
        row["file"] = str(file)
        rows.append(row)
        log(f"CGD {d}: R@1 {row['recall@1'] * 100:.2f}, mAP {row['map'] * 100:.2f} ({seconds:.0f} s) -> {file}")
    results = {"data": splits.description, "n_train": len(splits.train), "n_eval": len(splits.eval),
               "rows": rows, "seconds": time.perf_counter() - t0, "config": cfg.to_dict()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(table(rows, cfg.eval.ks))
    log(f"wrote {out / 'model.safetensors'} and {out / 'results.json'} in {results['seconds']:.0f} s")
    return results
