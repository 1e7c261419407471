"""The AFF pipeline behind `retrieval-sdk train aff`: extractors -> cached features -> mixer + query
(momentum classifier) -> one embedding space, evaluated against every baseline on a held-out split.

Steps (each cached under cfg.out, so a re-run skips what is done):
1. data: the labelled training split and the held-out evaluation split (see DataConfig);
2. extractors: DELG / DOLG / CVNet trained with ArcFace on the training split (or loaded), then frozen
   -> out/extractors/<name>.safetensors;
3. features of both splits, extracted once -> out/features/<split>/<name>/ (memory-mapped);
4. baselines on the features: each single feature, the ensemble, concat+MLP;
5. AFF: dynamic mixer (ArcFace, W_mix) + query model (ArcFace on W_q, momentum copy of W_mix);
6. ablations (shared classifier, two-stage) trained the same way from the same seed; the paper's studies
   when configured (training/aff/studies.py): fusion variants with their query models, robustness to
   noisy features, leave-one-feature-out;
7. evaluation on the held-out split: leave-one-out class-based mAP and R@1; symmetric for every gallery
   representation, asymmetric (query model vs mixer gallery) for each trained pair;
8. outputs: gallery.safetensors (extractors + mixer, one module) and query.safetensors (the query
   EmbeddingModel), both in the format `retrieval-sdk export` reads, with one embedding_space id, and
   results.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.aff.config import ABLATION_CHANGES, AFFConfig, JointConfig
from training.aff.features import FeatureSet, LabelError, check_labels, dataset_fingerprint, extract_features
from training.aff.gallery import save_gallery
from training.aff.mixer import ConcatMLP, MixerArch, build_mixer, ensemble
from training.aff.query import QueryClassifier, build_query_model
from training.aff.studies import StudyData, format_studies, leave_one_out_study, robustness_study, study_checks
from training.data import LabelledImages, Splits, load_splits
from training.embed import embed_images
from training.evaluate import asymmetric_eval, labelled_eval
from training.checkpoint import FORMAT, CheckpointError, CheckpointMeta, load_strict, read_header, save_checkpoint
from training.extractors import (ExtractorConfig, GalleryExtractor, build_extractor, load_extractor, load_released,
                                 save_extractor, train_extractor)
from training.extractors.released import CLASSIFIERS
from training.fit import Checkpoints, FitConfig, OptimConfig, fit, stage_fit
from training.losses import ArcFace
from training.models import new_space_id
from training.transforms import eval_transform, train_transform
from training.errors import TrainingError

Log = Callable[[str], None]
DEFAULT_LAYOUT = {"cvnet": "cvnet", "dolg": "dolg-pytorch", "delg": "delg-pytorch"}


# ------------------------------------------------------------------------------------------ data


# ------------------------------------------------------------------------------------------ extractors


def prepare_extractor(ec: ExtractorConfig, train: LabelledImages, train_fp: str, out: Path, progress: bool,
                      log: Log, device: str = "cpu",
                      checkpoints: Checkpoints | None = None) -> tuple[GalleryExtractor, Path, float]:
    """Train (or load the cached / released) extractor; returns it frozen, its checkpoint and seconds spent."""
    t0 = time.perf_counter()
    path = out / "extractors" / f"{ec.name}.safetensors"
    text = json.dumps({"config": ec.to_dict(), "data": train_fp, "classes": len(train.classes)}, sort_keys=True)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    if path.is_file():
        try:
            cached = read_header(path)["meta"].extra.get("fingerprint")
        except (CheckpointError, KeyError):
            cached = None
        if cached == fingerprint:
            ex = load_extractor(path)
            log(f"  {ec.name}: trained extractor reused from {path}")
            return ex, path, time.perf_counter() - t0
        log(f"  {ec.name}: {path} was trained with another config or data; retraining")
    ex = build_extractor(ec, num_classes=len(train.classes))
    if ec.weights and ec.kind != "mabnet":  # a mabnet extractor is its `train mabnet` checkpoint, read when built
        if read_header(ec.weights)["format"] == FORMAT:  # an extractor saved by this project
            saved = load_extractor(ec.weights)
            own_heads = {k: v for k, v in ex.state_dict().items() if k.startswith(CLASSIFIERS)}
            same_labels = saved.num_classes == ex.num_classes
            load_strict(ex, {**own_heads, **{k: v for k, v in saved.state_dict().items()
                                             if same_labels or not k.startswith(CLASSIFIERS)}}, str(ec.weights))
            log(f"  {ec.name}: weights from {ec.weights}" + ("" if same_labels else " (classifier heads: new labels)"))
        elif ec.kind not in DEFAULT_LAYOUT:
            raise TrainingError(f"extractor {ec.name}: there are no released {ec.kind} checkpoints; set weights to an "
                                "extractor file saved by `train aff` (OUT/extractors/NAME.safetensors) or to null")
        else:
            report = load_released(ex, ec.weights, DEFAULT_LAYOUT[ec.kind])
            log(f"  {ec.name}: released {DEFAULT_LAYOUT[ec.kind]} weights, {report.loaded} tensors"
                + (f", classifier heads skipped: {len(report.skipped_classifiers)}" if report.skipped_classifiers else ""))
    params = sum(p.numel() for p in ex.parameters()) / 1e6
    log(f"  {ec.name}: {ec.kind.upper()} on {ec.backbone} ({ex.weights_source}), {params:.2f}M params, "
        f"{ex.global_dim}-d global" + (f" + {ex.num_local}x{ex.local_dim}-d local" if ex.num_local else "")
        + f", input {ex.spec.input_size[0]} px, scales {list(ec.scales)}")
    resume = stage_fit(checkpoints, f"extractor-{ec.name}", fingerprint)
    history = train_extractor(ex, train, progress, log, device, resume) if ec.train.epochs else []
    ex.eval()
    save_extractor(ex, path, fingerprint, extra={"history": history})
    if resume:  # the saved extractor is what a re-run reuses; its training state is no longer needed
        shutil.rmtree(resume["checkpoint_dir"], ignore_errors=True)
    return ex, path, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ training


class FeatureBatches:
    """Shuffled batches of cached features, (mixer inputs, labels), a new order per pass (epoch)."""

    def __init__(self, features: FeatureSet, labels: torch.Tensor, batch_size: int, rng: np.random.Generator):
        self.features, self.labels, self.batch_size, self.rng = features, labels, batch_size, rng

    def __len__(self) -> int:  # batches of fewer than 2 rows are dropped
        n, b = self.features.count, self.batch_size
        return n // b + (n % b >= 2)

    def __iter__(self):
        order = self.rng.permutation(self.features.count)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            if len(idx) >= 2:
                yield self.features.batch(idx), self.labels[idx]


@dataclass
class TrainedPair:
    """A mixer and a query model trained into one space (one variant)."""

    variant: str
    mixer: torch.nn.Module
    arcface: ArcFace
    query: torch.nn.Module
    history: dict = field(default_factory=dict)
    seconds: float = 0.0
    warm: "WarmMixer | None" = None


def train_fusion_model(model: torch.nn.Module, features: FeatureSet, num_classes: int, epochs: int, lr: float,
                       batch_size: int, s: float, m: float, seed: int, desc: str, progress: bool, log: Log,
                       weight_decay: float = 1e-4, max_steps: int | None = None, device: str = "cpu",
                       checkpoint: dict | None = None) -> tuple[ArcFace, list[float]]:
    """ArcFace training of a feature-only model (mixer warm-up, concat+MLP baseline) with `training.fit`;
    `checkpoint`: FitConfig checkpoint arguments (`training.fit.stage_fit`) to make it resumable."""
    torch.manual_seed(seed)
    arc = ArcFace(model.embedding_dim, num_classes, s=s, m=m)
    rng = np.random.default_rng(seed)
    rng.permutation(features.count)  # the v1 loop drew one order to count its steps: kept, so figures reproduce
    data = FeatureBatches(features, torch.from_numpy(features.labels), batch_size, rng)
    history = fit(lambda batch: {"loss": arc(model(batch[0]), batch[1])}, data, {"model": model, "arcface": arc},
                  [{"params": list(model.parameters()) + list(arc.parameters()), "lr": lr}],
                  OptimConfig("adamw", weight_decay=weight_decay),
                  FitConfig(epochs=epochs, max_steps=max_steps, device=device, desc=desc, progress=progress,
                            **(checkpoint or {})), log=None)
    model.cpu(), arc.cpu()
    losses = [h["loss"] for h in history]
    if epochs:
        log(f"  {desc}: ArcFace loss per epoch " + ", ".join(f"{x:.2f}" for x in losses))
    return arc, losses


@dataclass
class WarmMixer:
    """A mixer and its ArcFace (W_mix) after the mixer-only stage on the cached features. Variants that
    share that stage's settings start from copies of one warm-up instead of repeating it."""

    key: tuple
    mixer: torch.nn.Module
    arcface: ArcFace
    history: list[float]

    def copy(self) -> tuple[torch.nn.Module, ArcFace, list[float]]:
        return copy.deepcopy(self.mixer), copy.deepcopy(self.arcface), list(self.history)


def _warm_key(cfg: AFFConfig, joint: JointConfig, kind: str = "transformer", features: FeatureSet | None = None) -> tuple:
    key = (json.dumps(cfg.mixer.__dict__, sort_keys=True), cfg.embedding_dim, joint.mixer_epochs, joint.mixer_lr,
           joint.batch_size, joint.arcface_s, joint.arcface_m, joint.weight_decay, joint.max_steps, joint.seed)
    # the main mixer's key as before (resumable runs of earlier versions keep their checkpoints)
    return key + ((kind,) if kind != "transformer" else ()) + ((tuple(features.names),) if features else ())


def warm_up_mixer(cfg: AFFConfig, joint: JointConfig, features: FeatureSet, num_classes: int, desc: str,
                  progress: bool = True, log: Log = print, device: str = "cpu",
                  checkpoints: Checkpoints | None = None, kind: str = "transformer") -> WarmMixer:
    """Stage 1: the fusion model of `kind` (the dynamic mixer by default) alone, ArcFace on the cached
    features (the joint schedule's warm-up, the two-stage schedule's first stage, and on its own the
    mixer of the robustness and leave-one-out studies)."""
    torch.manual_seed(joint.seed)
    arch = MixerArch(inputs=features.specs(), kind=kind, dim=cfg.mixer.dim, depth=cfg.mixer.depth,
                     heads=cfg.mixer.heads, mlp_ratio=cfg.mixer.mlp_ratio, dropout=cfg.mixer.dropout,
                     embedding_dim=cfg.embedding_dim, token_dropout=cfg.mixer.token_dropout)
    mixer = build_mixer(arch)
    key = _warm_key(cfg, joint, kind, features)
    what = "mixer" if kind == "transformer" else f"{kind} fusion"
    arc, history = train_fusion_model(
        mixer, features, num_classes, joint.mixer_epochs, joint.mixer_lr, joint.batch_size, joint.arcface_s,
        joint.arcface_m, joint.seed, f"{desc} {what} warm-up ({joint.mixer_epochs} epochs on features)",
        progress, log, joint.weight_decay, joint.max_steps, device,
        stage_fit(checkpoints, "mixer-warm-up" if kind == "transformer" else f"{kind}-warm-up",
                  [_warm_key(cfg, joint, kind), features.fingerprint]))
    return WarmMixer(key, mixer, arc, history)


def train_aff(cfg: AFFConfig, variant: str, joint: JointConfig, features: FeatureSet, images: LabelledImages,
              progress: bool = True, log: Log = print, warm: WarmMixer | None = None,
              device: str = "cpu", checkpoints: Checkpoints | None = None, kind: str = "transformer") -> TrainedPair:
    """Train the fusion model of `kind` (the dynamic mixer by default) and the query model into one space
    with the classifier tie in `joint`.

    `warm`: a finished mixer-only stage to start from (copied, not modified), when its settings match."""
    t0 = time.perf_counter()
    n_classes = len(images.classes)
    labels_np = check_labels(images.labels, features.count, n_classes, what="training images")
    if not np.array_equal(labels_np, features.labels):
        raise LabelError("the training images' labels differ from the labels the features were cached with")
    labels = torch.from_numpy(labels_np)

    # stage 1: the mixer alone on the cached features (warm-up for joint, the first stage for two_stage)
    if warm is None or warm.key != _warm_key(cfg, joint, kind, features):
        warm = warm_up_mixer(cfg, joint, features, n_classes, f"[{variant}]", progress, log, device, checkpoints, kind)
    else:
        log(f"  [{variant}] mixer warm-up: starting from the same {joint.mixer_epochs}-epoch warm-up")
    mixer, arc, mixer_only = warm.copy()
    torch.manual_seed(joint.seed + 1)  # the query model's new layers: the same init in every variant

    query = build_query_model(cfg.query.backbone, cfg.embedding_dim, cfg.query.image_size, cfg.query.pretrained)
    two_stage = joint.schedule == "two_stage"
    qcls = QueryClassifier(arc, mode="frozen" if two_stage else joint.classifier, alpha=joint.alpha)
    qcls.sync()

    groups = [
        {"params": list(query.backbone.parameters()), "lr": joint.query_lr * joint.query_backbone_lr_scale},
        {"params": list(query.pool.parameters()) + list(query.whiten.parameters()), "lr": joint.query_lr},
    ]
    if not two_stage:
        groups.append({"params": list(mixer.parameters()) + list(arc.parameters()), "lr": joint.mixer_lr})
    transform = train_transform(query.spec, seed=joint.seed) if joint.augment else eval_transform(query.spec)

    def collate(items):  # images, their labels and (joint schedule) their cached mixer inputs
        idx = np.array([i for _, i in items])
        return (torch.stack([transform(src) for src, _ in items]), labels[idx],
                {} if two_stage else features.batch(idx))

    loader = DataLoader(
        [(src, i) for i, src in enumerate(images.paths)], batch_size=joint.batch_size, shuffle=True,
        drop_last=len(images) > joint.batch_size, generator=torch.Generator().manual_seed(joint.seed),
        collate_fn=collate,
    )

    def step(batch) -> dict:
        x, y, mixer_inputs = batch
        loss_q = qcls.loss(query(x), y, joint.arcface_s, joint.arcface_m)
        terms = {"loss": joint.query_weight * loss_q, "query": loss_q}
        if not two_stage:
            terms["mixer"] = arc(mixer(mixer_inputs), y)
            terms["loss"] = terms["loss"] + terms["mixer"]
        return terms

    def train_modes(epoch: int) -> None:
        query.train()
        mixer.train(not two_stage)

    stage = "query" if two_stage else "joint"
    epochs = fit(step, loader, {"query": query, "mixer": mixer, "arcface": arc, "classifier": qcls}, groups,
                 OptimConfig("adamw", weight_decay=joint.weight_decay),
                 FitConfig(epochs=joint.epochs, max_steps=joint.max_steps, device=device, channels_last=True,
                           desc=f"[{variant}] {stage}", progress=progress,
                           **stage_fit(checkpoints, stage if kind == "transformer" else f"{stage}-{kind}",
                                       [cfg.mixer.__dict__, cfg.query.__dict__, cfg.embedding_dim, joint.__dict__,
                                        features.fingerprint] + ([kind] if kind != "transformer" else []))),
                 on_epoch_start=train_modes, after_step=qcls.update, log=log)  # W_q <- alpha W_q + (1-alpha) W_mix
    history = {"mixer_only": mixer_only, "query": [e["query"] for e in epochs],
               "mixer": [e["mixer"] for e in epochs if "mixer" in e]}
    for module in (query, mixer, arc, qcls):
        module.cpu()
    return TrainedPair(variant, mixer, arc, query, history, time.perf_counter() - t0, warm)


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def embed_features(model: torch.nn.Module, features: FeatureSet, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [model(features.batch(np.arange(i, min(i + batch_size, features.count)))).numpy()
           for i in range(0, features.count, batch_size)]
    return np.concatenate(out).astype(np.float32)


def symmetric(emb: np.ndarray, labels: np.ndarray) -> dict:
    r = labelled_eval(emb, labels, emb, labels, ks=(1,), exclude_self=True)
    return {"map": r.map, "r1": r.recall[1]}


@dataclass
class VariantResult:
    variant: str
    mixer: dict
    asym: dict
    query_sym: dict
    ratio: float


def evaluate_pair(pair: TrainedPair, eval_features: FeatureSet, eval_images: LabelledImages, batch_size: int,
                  progress: bool) -> VariantResult:
    labels = eval_features.labels
    g = embed_features(pair.mixer, eval_features)
    q = embed_images(pair.query, eval_images.paths, pair.query.spec, batch_size=batch_size,
                     desc=f"query ({pair.variant})", progress=progress)
    r = asymmetric_eval(q, g, labels, labels, query_emb_g=g, exclude_self=True)
    return VariantResult(pair.variant, {"map": r.sym_map, "r1": r.sym_recall_at_1},
                         {"map": r.asym_map, "r1": r.asym_recall_at_1}, symmetric(q, labels), r.ratio)


# ------------------------------------------------------------------------------------------ pipeline


def run_aff(cfg: AFFConfig, progress: bool = True, overwrite_cache: bool = False, log: Log = print,
            device: str = "cpu", resume: bool = True) -> dict:
    """Run the whole pipeline, training on `device` (cpu|cuda|mps); write checkpoints and results.json
    under cfg.out; return the results.

    Every training stage checkpoints into cfg.out/checkpoints, so an interrupted run continues where it
    stopped (`resume=False`: each stage starts afresh); the folder is removed once the run has finished."""
    out = cfg.start(device)  # an absent GPU stops the run here, not after the data and features
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    checkpoints = Checkpoints(out / "checkpoints", resume)
    torch.manual_seed(cfg.seed)

    t = time.perf_counter()
    splits = load_splits(cfg)
    train_labels = check_labels(splits.train.labels, len(splits.train), len(splits.train.classes), "training images")
    eval_labels = check_labels(splits.eval.labels, len(splits.eval), len(splits.eval.classes), "evaluation images")
    train_fp = dataset_fingerprint(splits.train.paths, splits.train.labels)
    timings["data"] = time.perf_counter() - t
    log(f"data: {splits.description}")

    log(f"gallery extractors ({len(cfg.extractors)}), trained with ArcFace on the training split, then frozen:")
    extractors: list[GalleryExtractor] = []
    for ec in cfg.extractors:
        ex, _, sec = prepare_extractor(ec, splits.train, train_fp, out, progress, log, device, checkpoints)
        extractors.append(ex)
        timings[f"extractor {ec.name}"] = sec

    log("features (extracted once, memory-mapped caches):")
    t = time.perf_counter()
    caches = extract_splits(extractors, splits, cfg, overwrite_cache, progress, log)
    train_set = FeatureSet(caches["train"], train_labels, len(splits.train.classes), cfg.mixer.use_local).load()
    eval_set = FeatureSet(caches["eval"], eval_labels, len(splits.eval.classes), cfg.mixer.use_local).load()
    timings["features"] = time.perf_counter() - t

    # ---- baselines
    t = time.perf_counter()
    rows = [{"name": f"{ex.name} ({ex.config.backbone}, {ex.global_dim}-d)", "kind": "single", "protocol": "symmetric",
             **symmetric(g, eval_labels)} for ex, g in zip(extractors, eval_set.globals_())]
    rows.append({"name": f"ensemble (concat of {len(extractors)} normalised)", "kind": "ensemble",
                 "protocol": "symmetric", **symmetric(ensemble(eval_set.globals_()), eval_labels)})
    if cfg.baseline.concat_mlp:
        arch = MixerArch(inputs=train_set.specs(), kind="concat_mlp", dim=cfg.mixer.dim, dropout=cfg.mixer.dropout,
                         embedding_dim=cfg.embedding_dim)
        torch.manual_seed(cfg.seed)
        mlp = ConcatMLP(arch)
        train_fusion_model(mlp, train_set, len(splits.train.classes), cfg.baseline.epochs, cfg.baseline.lr,
                           cfg.train.batch_size, cfg.train.arcface_s, cfg.train.arcface_m, cfg.seed,
                           "concat+MLP baseline", progress, log, max_steps=cfg.train.max_steps, device=device,
                           checkpoint=checkpoints.stage("concat-mlp", [
                               arch.__dict__, cfg.baseline.__dict__, cfg.train.batch_size, cfg.train.arcface_s,
                               cfg.train.arcface_m, cfg.train.max_steps, cfg.seed, train_set.fingerprint]))
        rows.append({"name": "concat+MLP (ArcFace on features)", "kind": "concat_mlp", "protocol": "symmetric",
                     **symmetric(embed_features(mlp, eval_set), eval_labels)})
    timings["baselines"] = time.perf_counter() - t

    # ---- AFF: main variant + ablations
    variants = [("main", cfg.train)] + [(a, replace(cfg.train, **ABLATION_CHANGES[a])) for a in cfg.ablations]
    results: dict[str, VariantResult] = {}
    pairs: dict[str, TrainedPair] = {}
    warm: WarmMixer | None = None
    for key, joint in variants:
        name = "two-stage" if joint.schedule == "two_stage" else f"{joint.classifier} classifier"
        log(f"AFF training [{name}]: mixer {cfg.mixer.depth}x{cfg.mixer.dim}-d over {len(train_set.specs())} inputs, "
            f"query {cfg.query.backbone} @ {cfg.query.image_size} px, {joint.epochs} epochs")
        pair = train_aff(cfg, name, joint, train_set, splits.train, progress, log, warm, device, checkpoints)
        warm = pair.warm
        t = time.perf_counter()
        results[key] = evaluate_pair(pair, eval_set, splits.eval, cfg.extract_batch_size, progress)
        timings[f"aff {name}"] = pair.seconds + time.perf_counter() - t
        pairs[key] = pair

    fusions: dict[str, VariantResult] = {}
    for kind in cfg.fusion_variants:
        log(f"fusion variant [{kind}]: trained like the mixer, then jointly with its own query model")
        pair = train_aff(cfg, f"{kind} fusion", cfg.train, train_set, splits.train, progress, log, None, device,
                         checkpoints, kind)
        t = time.perf_counter()
        fusions[kind] = evaluate_pair(pair, eval_set, splits.eval, cfg.extract_batch_size, progress)
        timings[f"fusion {kind}"] = pair.seconds + time.perf_counter() - t
    studies = run_studies(cfg, splits, caches, train_labels, eval_labels, pairs["main"].warm, train_fp, out,
                          overwrite_cache, progress, log, device, checkpoints, timings)

    # ---- outputs
    main = pairs["main"]
    space = new_space_id("aff")
    gallery_path = save_gallery(out / "gallery.safetensors", main.mixer, extractors, space,
                                extra={"variant": main.variant, "mixer_map": results["main"].mixer["map"]})
    query_path = save_checkpoint(main.query, out / "query.safetensors", CheckpointMeta(
        embedding_space=space, role="query", name=f"aff-query-{cfg.query.backbone}",
        extra={"gallery": "gallery.safetensors", "asymmetric_map": results["main"].asym["map"],
               "symmetric_mixer_map": results["main"].mixer["map"], "config": cfg.name}))
    timings["total"] = time.perf_counter() - t_start
    report = build_report(cfg, splits, rows, results, timings, space, gallery_path, query_path, fusions, studies)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(checkpoints.root, ignore_errors=True)  # finished: the outputs above are what a user keeps
    log("")
    log(format_report(report))
    return report


def extract_splits(extractors: list[GalleryExtractor], splits: Splits, cfg: AFFConfig, overwrite_cache: bool,
                   progress: bool, log: Log) -> dict[str, list]:
    """Each extractor's feature cache of each split ({"train": [...], "eval": [...]}, in extractor order)."""
    caches: dict[str, list] = {"train": [], "eval": []}
    for split, data in (("train", splits.train), ("eval", splits.eval)):
        for ex in extractors:
            caches[split].append(extract_features(
                ex, data.paths, data.labels, Path(cfg.out) / "features" / split / ex.name,
                batch_size=cfg.extract_batch_size, overwrite=overwrite_cache, progress=progress, log=log,
                desc=f"extract {ex.name} ({split})"))
    return caches


def run_studies(cfg: AFFConfig, splits: Splits, caches: dict[str, list], train_labels: np.ndarray,
                eval_labels: np.ndarray, clean_warm: WarmMixer, train_fp: str, out: Path, overwrite_cache: bool,
                progress: bool, log: Log, device: str, checkpoints: Checkpoints, timings: dict) -> dict:
    """The robustness and leave-one-feature-out tables asked for by `cfg` (training/aff/studies.py)."""
    data = StudyData(caches["train"], caches["eval"], train_labels, eval_labels, len(splits.train.classes),
                     len(splits.eval.classes), cfg.mixer.use_local)
    studies: dict = {}
    if cfg.robustness.enabled:
        t = time.perf_counter()
        log("robustness: noisy gallery features")
        groups: dict[str, tuple[list, list, tuple[str, ...]]] = {}
        weak = [prepare_extractor(ec, splits.train, train_fp, out, progress, log, device, checkpoints)[0]
                for ec in cfg.robustness.extractors]
        if weak:
            c = extract_splits(weak, splits, cfg, overwrite_cache, progress, log)
            groups[f"{len(weak)} weak ({', '.join(ex.name for ex in weak)})"] = (c["train"], c["eval"], ())
        if cfg.robustness.noise_dim:
            ec = cfg.robustness.noise_extractor(cfg.seed)
            noise = prepare_extractor(ec, splits.train, train_fp, out, progress, log, device, checkpoints)[0]
            c = extract_splits([noise], splits, cfg, overwrite_cache, progress, log)
            for draw in cfg.robustness.noise_draws:
                name = f"gaussian noise {ec.dim}-d" + (" (redrawn)" if draw == "redrawn" else "")
                groups[name] = (c["train"], c["eval"], (ec.name,) if draw == "redrawn" else ())
        studies["robustness"] = robustness_study(cfg, data, groups, clean_warm, progress, log, device, checkpoints)
        timings["robustness"] = time.perf_counter() - t
    if cfg.leave_one_out:
        t = time.perf_counter()
        studies["leave_one_out"] = leave_one_out_study(cfg, data, clean_warm, progress, log, device, checkpoints)
        timings["leave-one-out"] = time.perf_counter() - t
    return studies


def build_report(cfg: AFFConfig, splits: Splits, rows: list[dict], results: dict[str, VariantResult],
                 timings: dict, space: str, gallery_path: Path, query_path: Path,
                 fusions: dict[str, VariantResult] | None = None, studies: dict | None = None) -> dict:
    main = results["main"]
    best_single = max((r for r in rows if r["kind"] == "single"), key=lambda r: r["map"])
    ens = next(r for r in rows if r["kind"] == "ensemble")
    checks = {
        "mixer_beats_best_single": {"pass": main.mixer["map"] > best_single["map"],
                                    "mixer": main.mixer["map"], "best_single": best_single["map"],
                                    "best_single_name": best_single["name"]},
        "mixer_beats_ensemble": {"pass": main.mixer["map"] > ens["map"], "mixer": main.mixer["map"], "ensemble": ens["map"]},
        "asym_at_least_0.9_sym": {"pass": main.ratio >= 0.9, "ratio": main.ratio},
    }
    if "shared" in results:
        sh = results["shared"]
        checks["momentum_beats_shared"] = {"pass": main.asym["map"] > sh.asym["map"], "momentum_asym": main.asym["map"],
                                           "shared_asym": sh.asym["map"], "momentum_mixer": main.mixer["map"],
                                           "shared_mixer": sh.mixer["map"]}
    report = {
        "config": cfg.to_dict(),
        "data": splits.description,
        "protocol": "leave-one-out over the evaluation split: every image queries all the others; positives share its "
                    "class label; mAP = mean non-interpolated AP, R@1 = top-1 is a positive",
        "embedding_space": space,
        "gallery": str(gallery_path),
        "query": str(query_path),
        "rows": rows,
        "variants": {k: asdict(v) for k, v in results.items()},
        "fusions": {k: asdict(v) for k, v in (fusions or {}).items()},
        **(studies or {}),
        "checks": checks,
        "seconds": timings,
    }
    checks.update(study_checks(report))
    return report


def format_report(report: dict) -> str:
    """The result table printed at the end of `retrieval-sdk train aff`."""
    cfg = report["config"]
    lines = [f"== AFF results: {cfg['name']} ==", f"data: {report['data']}",
             "protocol: " + report["protocol"], ""]
    header = f"{'gallery / model':58s} {'protocol':11s} {'mAP':>7s} {'R@1':>7s}"
    lines += [header, "-" * len(header)]
    for r in report["rows"]:
        lines.append(f"{r['name']:58s} {r['protocol']:11s} {100 * r['map']:7.2f} {100 * r['r1']:7.2f}")
    qb = cfg["query"]["backbone"]
    for key, v in report["variants"].items():
        tag = v["variant"] if key == "main" else f"ablation: {v['variant']}"
        lines.append(f"{'AFF mixer [' + tag + ']':58s} {'symmetric':11s} {100 * v['mixer']['map']:7.2f} {100 * v['mixer']['r1']:7.2f}")
        lines.append(f"{'  query ' + qb + ' -> mixer gallery':58s} {'asymmetric':11s} {100 * v['asym']['map']:7.2f} {100 * v['asym']['r1']:7.2f}")
        lines.append(f"{'  asym / sym':58s} {'':11s} {v['ratio']:7.3f}")
        lines.append(f"{'  query ' + qb + ' alone (reference)':58s} {'symmetric':11s} {100 * v['query_sym']['map']:7.2f} {100 * v['query_sym']['r1']:7.2f}")
    lines.append("")
    c = report["checks"]
    yes = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    s = c["mixer_beats_best_single"]
    lines.append(f"[{yes(s['pass'])}] mixer mAP {100 * s['mixer']:.2f} > best single feature {100 * s['best_single']:.2f} ({s['best_single_name']})")
    s = c["mixer_beats_ensemble"]
    lines.append(f"[{yes(s['pass'])}] mixer mAP {100 * s['mixer']:.2f} > ensemble {100 * s['ensemble']:.2f}")
    s = c["asym_at_least_0.9_sym"]
    lines.append(f"[{yes(s['pass'])}] asymmetric / symmetric mixer mAP = {s['ratio']:.3f} >= 0.9")
    if "momentum_beats_shared" in c:
        s = c["momentum_beats_shared"]
        lines.append(f"[{yes(s['pass'])}] momentum classifier asym mAP {100 * s['momentum_asym']:.2f} > shared classifier "
                     f"{100 * s['shared_asym']:.2f} (mixer sym: {100 * s['momentum_mixer']:.2f} vs {100 * s['shared_mixer']:.2f})")
    lines += format_studies(report)
    sec = report["seconds"]
    lines.append("")
    lines.append("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in sec.items()))
    lines.append(f"embedding space {report['embedding_space']}: gallery {report['gallery']}, query {report['query']}")
    return "\n".join(lines)
