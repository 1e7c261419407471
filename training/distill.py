"""`retrieval-sdk train distill`: a phone-size student trained from a black-box teacher's rankings on
unlabelled images (data-efficient rank distillation, Laskar & Kannala, ACCV 2020), on the one training loop.

The run: pick D (at most `max_images` unlabelled images: a folder, the training split of a labelled set
whose labels are dropped, and/or new procedural objects); embed D once with the teacher (cached on disk, `teacher_budget`
checked first); train the student with `training.rank_distill.distill_loss` by `training.fit.fit`
(Adam, lr * exp(-0.01 * epoch), weight decay 1e-6); average the weights of `average_epochs`; evaluate on
held-out labelled images (the teacher's and the student's symmetric mAP, and in asymmetric mode the
student's queries against the teacher's gallery); write student.safetensors and results.json. With
`ablations`, the same run is repeated per switch on the same D and teacher embeddings, one table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from sdk.preprocess import ImageError, load_image
from sdk.vectors import l2_normalize
from training.config import ConfigError, DataConfig, RunConfig, check_known
from training.checkpoint import CheckpointMeta, load_checkpoint, read_header, save_checkpoint
from training.data import (DatasetError, ImageDataset, LabelledImages, image_folder, load_splits, make_instance_set,
                           unlabelled_folder, write_images)
from training.embed import embed_images, embed_multiscale
from training.evaluate import format_table, labelled_eval
from training.fit import FitConfig, OptimConfig, fit, resolve_device
from training.heads import apply_pca_whitening, learn_pca_whitening
from training.models import EmbeddingModel, ModelConfig
from training.rank_distill import RankDistillConfig, average_weights, distill_loss
from training.teacher import DEFAULT_CACHE, Teacher, TeacherError, resolve_teacher, teacher_embeddings
from training.transforms import eval_transform

TEACHER_KEY_ENV = "RETRIEVAL_SDK_TEACHER_KEY"  # the API key (write scope) of a teacher behind `retrieval-sdk serve`
# name -> the change it makes to the run (the ablation switches)
ABLATIONS: dict[str, dict] = {
    "no_augmentation": {"mix_iterations": 0},  # no representation mixup: the originals alone
    "no_mixup_labelling": {"mixup_labelling": False},  # mixed samples labelled by similarity only
    "grad_through_mixed": {"detach_mixed": False},
    "symmetric": {"cross_weight": 0.0, "pull_weight": 0.0, "symmetric_weight": 1.0},
    "asymmetric": {"cross_weight": 1.0, "pull_weight": 1.0},
}


@dataclass(frozen=True)
class StudentConfig:
    """The student: a registry backbone + GeM (+ an FC to `dim`; None keeps the GeM dim, the paper's)."""

    backbone: str = "mobilenetv2_100"
    pretrained: bool | str = True
    image_size: int = 224
    dim: int | None = None  # asymmetric mode: None means the teacher's dim
    init: str | None = None  # start from this checkpoint (e.g. the quickstart's closed-form query model)


@dataclass(frozen=True)
class EvalConfig:
    """How the student is measured: multi-scale GeM-combined embeddings (scales), square-rooted PCA
    whitening learned on D (whiten; symmetric rows only, a whitened student is no longer in the teacher's
    space), at most `limit` held-out images."""

    scales: tuple[float, ...] = (1.0, 1 / math.sqrt(2), 0.5)
    whiten: bool = True
    limit: int | None = 2000


@dataclass(frozen=True)
class ProceduralConfig:
    """More unlabelled images for D: new procedural objects (`make_instance_set` with a seed of their own),
    so a student also learns the teacher's embedding of objects the teacher never trained on."""

    n_objects: int = 200
    n_views: int = 8
    image_size: int = 128
    seed: int = 1


@dataclass(frozen=True)
class DistillConfig(RunConfig, run="distill"):
    """One `train distill` run. Defaults are the paper's: tau 0.75, R 10, |D| 4000, B 1000, 30 epochs,
    weights of epochs 20 and 30 averaged."""

    # a labelled set: its training split joins D (labels dropped), its held-out split evaluates
    data: DataConfig | None = None
    teacher: str = ""  # checkpoint .safetensors | bundle folder | http(s)://serve-url (its /v1/embed; a write
    # key in $RETRIEVAL_SDK_TEACHER_KEY, kept out of configs and results)
    teacher_train: dict | None = None  # no `teacher`: train one with labels on data's training split (ExtractorConfig)
    teacher_budget: int | None = None  # max images sent to the teacher (cached ones are free)
    teacher_cache: str | None = str(DEFAULT_CACHE)
    images: str | None = None  # a folder of unlabelled images, part of D
    procedural: ProceduralConfig | None = None  # new procedural objects, part of D (written under OUT/data)
    eval_images: str | None = None  # a labelled folder (class subfolders) to evaluate on instead
    max_images: int = 4000  # |D|
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: RankDistillConfig = field(default_factory=RankDistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    batch_size: int = 1000  # B
    epochs: int = 30
    lr: float = 1e-4  # l0 (the paper decays it as l0 * exp(-0.01 * epoch))
    weight_decay: float = 1e-6
    average_epochs: tuple[int, ...] = (20, 30)
    _checks = {"batch_size max_images": ">= 2", "epochs": ">= 1"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_known(self.ablations, sorted(ABLATIONS), "ablation")
        if not (self.teacher or self.teacher_train):
            raise ConfigError("say which teacher to distil: --teacher CHECKPOINT|BUNDLE|URL (or teacher_train in a config)")
        if self.teacher_train and self.data is None:
            raise ConfigError("teacher_train trains the teacher with labels, so it needs a labelled `data` section")
        if not (self.images or self.data or self.procedural):
            raise ConfigError("no images to distil on: pass --images DIR (unlabelled photos) or a config with `data`")
        if (self.procedural and self.data and self.data.kind == "instances"
                and self.procedural.seed == self.data.seed):
            raise ConfigError(f"procedural.seed {self.procedural.seed} equals data.seed: D would hold the evaluation "
                              "objects; give procedural another seed")


load_distill_config = DistillConfig.load


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DistillData:
    """D (unlabelled training paths) and the labelled held-out evaluation set (None: no evaluation)."""

    train: list[Path]
    eval: LabelledImages | None
    teacher_train: LabelledImages | None  # the labelled training split, for teacher_train


def _readable(path: Path) -> bool:
    """Whether the SDK's one image decoder (`sdk.preprocess.load_image`) reads the file."""
    try:
        load_image(path)
        return True
    except ImageError:
        return False


def load_distill_data(cfg: DistillConfig, log: Callable[[str], None] | None = None) -> DistillData:
    """D and the evaluation set, as files (the teacher's cache is keyed by file contents)."""
    paths: list[Path] = []
    evaluation = teacher_set = None
    if cfg.data is not None:
        splits = load_splits(cfg)
        root = Path(cfg.out) / "data"
        teacher_set, evaluation = write_images(splits.train, root / "train"), write_images(splits.eval, root / "held_out")
        paths += [Path(p) for p in teacher_set.paths]
    if cfg.images:
        found = unlabelled_folder(cfg.images)
        ok = [_readable(p) for p in found]
        bad = [p for p, good in zip(found, ok) if not good]
        if len(bad) == len(found):
            raise DatasetError(f"none of the {len(found)} files in {cfg.images} is a readable image "
                               f"(first: {found[0].name}); use JPEG/PNG photos")
        if bad and log is not None:
            log(f"skipped {len(bad)} unreadable files in {cfg.images} (first: {bad[0].name})")
        paths += [p for p, good in zip(found, ok) if good]
    if cfg.procedural is not None:
        p = cfg.procedural
        root = Path(cfg.out) / "data" / f"procedural-{p.n_objects}x{p.n_views}-{p.image_size}px-seed{p.seed}"
        paths += [Path(x) for x in make_instance_set(root, p.n_objects, p.n_views, p.image_size, p.seed).paths]
    if cfg.eval_images:
        evaluation = image_folder(cfg.eval_images)
    if len(paths) > cfg.max_images:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(paths), cfg.max_images, replace=False))
        paths = [paths[i] for i in keep]
    if evaluation is not None and cfg.eval.limit and len(evaluation) > cfg.eval.limit:
        keep = np.sort(np.random.default_rng(cfg.seed + 1).choice(len(evaluation), cfg.eval.limit, replace=False))
        evaluation = evaluation.subset(keep.tolist())
    return DistillData(paths, evaluation, teacher_set)


# ------------------------------------------------------------------------------------------------ teacher


def train_teacher(cfg: DistillConfig, data: LabelledImages, device: str, progress: bool, log) -> Path:
    """A labelled teacher (a GeM + FC + ArcFace extractor) trained on the training split; reused when its
    file exists for the same config."""
    from training.extractors.base import ExtractorConfig, build_extractor
    from training.extractors.fit import train_extractor

    path = Path(cfg.out) / "teacher.safetensors"
    ecfg = ExtractorConfig.from_dict({"kind": "delg", "name": "teacher", "num_local": 0, **cfg.teacher_train})
    key = json.dumps(ecfg.to_dict(), sort_keys=True) + json.dumps(asdict(cfg.data), sort_keys=True, default=str)
    if path.is_file() and read_header(path)["meta"].extra.get("config") == key:
        log(f"teacher: {path} (trained earlier with this config)")
        return path
    log(f"teacher: training {ecfg.backbone} + GeM + ArcFace with labels on {len(data)} images "
        f"({ecfg.train.epochs} epochs)")
    extractor = build_extractor(ecfg, num_classes=len(data.classes))
    train_extractor(extractor, data, progress=progress, log=log, device=device)
    save_checkpoint(extractor, path, CheckpointMeta(role="gallery", name="teacher", extra={"config": key}))
    return path


# ------------------------------------------------------------------------------------------------ student


def _student_dim(cfg: DistillConfig, teacher_dim: int) -> int | None:
    """The student's FC dim (None: GeM's own); asymmetric mode needs the teacher's."""
    dim = cfg.student.dim if cfg.student.dim is not None else (teacher_dim if cfg.loss.asymmetric else None)
    if cfg.loss.asymmetric and dim != teacher_dim:
        raise TeacherError(f"asymmetric mode puts the student in the teacher's space, so its dim must be the "
                           f"teacher's {teacher_dim}, got student.dim={dim}")
    return dim


def build_student(cfg: DistillConfig, teacher_dim: int) -> EmbeddingModel:
    """A fresh student from the registry, or `student.init`'s checkpoint (its dim checked the same way)."""
    s = cfg.student
    dim = _student_dim(cfg, teacher_dim)
    if s.init:
        model, _ = load_checkpoint(s.init, expect="embedding_model")
        if cfg.loss.asymmetric and model.embedding_dim != teacher_dim:
            raise TeacherError(f"student.init {s.init} is {model.embedding_dim}-d but asymmetric mode needs the "
                               f"teacher's {teacher_dim}")
        return model
    return EmbeddingModel(ModelConfig(s.backbone, "gem", embedding_dim=dim, input_size=s.image_size),
                          pretrained=s.pretrained)


def train_student(cfg: DistillConfig, paths: Sequence[Path], targets: np.ndarray, teacher_dim: int,
                  device: str = "cpu", progress: bool = True, log=print) -> tuple[EmbeddingModel, list[dict]]:
    """The paper's training: batches of D, the rank-distillation loss, Adam with exp decay, averaged epochs."""
    torch.manual_seed(cfg.seed)
    student = build_student(cfg, teacher_dim)
    targets_t = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)).to(resolve_device(device))
    batch = min(cfg.batch_size, len(paths))
    loader = DataLoader(ImageDataset(list(zip(paths, range(len(paths)))), eval_transform(student.spec)),
                        batch_size=batch, shuffle=True, drop_last=True,  # (image, its row of the teacher embeddings)
                        generator=torch.Generator().manual_seed(cfg.seed))
    run_dir = Path(cfg.out) / "runs" / cfg.name
    epochs_kept = {e for e in cfg.average_epochs if 1 <= e <= cfg.epochs} or {cfg.epochs}

    def step(b) -> dict:
        x, idx = b
        # the mixing draws come from torch's RNG, which the loop checkpoints: a resumed run repeats them
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        loss, logged = distill_loss(student(x), targets_t[idx.to(targets_t.device)], cfg.loss, rng)
        return {"loss": loss, "positives": torch.tensor(logged["positives_per_query"])}

    def keep(epoch: int) -> None:
        if epoch + 1 in epochs_kept:
            save_checkpoint(student, run_dir / f"epoch{epoch + 1}.safetensors")

    key = json.dumps([cfg.to_dict(), len(paths)], sort_keys=True)
    history = fit(step, loader, {"student": student}, [{"params": list(student.parameters()), "lr": cfg.lr}],
                  OptimConfig("adam", weight_decay=cfg.weight_decay, schedule="exp", exp_decay=0.01),
                  FitConfig(epochs=cfg.epochs, device=device, checkpoint_dir=run_dir, run_key=key,
                            desc=f"distill {cfg.name}", progress=progress, seed=cfg.seed), on_epoch_end=keep, log=log)
    files = [run_dir / f"epoch{e}.safetensors" for e in sorted(epochs_kept)]
    states = [load_checkpoint(f)[0].state_dict() for f in files]
    student.load_state_dict(average_weights(states))
    return student.eval(), history


# ------------------------------------------------------------------------------------------------ eval


def evaluate_student(student: EmbeddingModel, teacher_eval: np.ndarray, eval_set: LabelledImages,
                     train_paths: Sequence[Path], cfg: EvalConfig, asymmetric: bool, progress: bool) -> dict:
    """Symmetric mAP of the student (multi-scale, optionally whitened on D) and, in asymmetric mode, the
    student's single-scale queries against the teacher's gallery (what the phone does)."""
    labels = np.asarray(eval_set.labels)
    single = embed_images(student, eval_set.paths, student.spec, desc="student (eval)", progress=progress)
    multi = embed_multiscale(student, eval_set.paths, student.spec, cfg.scales, progress=progress) \
        if len(cfg.scales) > 1 else single
    sym = multi
    if cfg.whiten:  # square-rooted PCA whitening learned on D's multi-scale embeddings
        train_emb = embed_multiscale(student, list(train_paths), student.spec, cfg.scales, progress=progress)
        mean, proj = learn_pca_whitening(train_emb, min(multi.shape[1], len(train_emb) - 1), power=0.25)
        sym = l2_normalize(apply_pca_whitening(multi, mean, proj))
    row = {"student_map": labelled_eval(single, labels, single, labels, ks=(1,), exclude_self=True).map,
           "student_multiscale_map": labelled_eval(sym, labels, sym, labels, ks=(1,), exclude_self=True).map}
    if asymmetric:
        asym = labelled_eval(single, labels, teacher_eval, labels, ks=(1,), exclude_self=True)
        row["asymmetric_map"] = asym.map
        row["self_cosine"] = float(np.mean(np.sum(single * teacher_eval, axis=1)))
    return row


# ------------------------------------------------------------------------------------------------ the run


_COLUMNS = [(key, title, 14, ".2f", scale) for key, title, scale in (
    ("student_map", "student mAP", 100), ("ratio", "x teacher", 1), ("student_multiscale_map", "multi-sc mAP", 100),
    ("asymmetric_map", "asym mAP", 100), ("asym_over_teacher", "asym/teacher", 1), ("self_cosine", "self cos", 1),
    ("final_loss", "final loss", 1))]


def _table(rows: list[dict], teacher_map: float | None) -> str:
    """One line per run: the student's figures beside the teacher's. `student mAP` is measured as the
    teacher's is (single scale, no whitening), so `x teacher` compares like with like; `multi-sc mAP` is
    the paper's evaluation (multi-scale, square-rooted whitening learned on D)."""
    first = f"teacher symmetric mAP {teacher_map * 100:.2f}" if teacher_map is not None else "no evaluation set"
    return first + "\n" + format_table(rows, _COLUMNS, "run", 20)


def run_distill(cfg: DistillConfig, device: str = "cpu", progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """The whole run (see the module docstring); returns what results.json holds."""
    log = log or (lambda _: None)
    out = cfg.start(device)
    key = os.environ.get(TEACHER_KEY_ENV) or None
    teacher: Teacher | None = resolve_teacher(cfg.teacher, key) if cfg.teacher else None  # a bad teacher fails first
    data = load_distill_data(cfg, log)
    teacher = teacher or resolve_teacher(str(train_teacher(cfg, data.teacher_train, device, progress, log)))
    if teacher.dim is not None:
        _student_dim(cfg, teacher.dim)  # a dim mismatch stops the run before any teacher call
    eval_paths = [] if data.eval is None else [Path(p) for p in data.eval.paths]
    run = teacher_embeddings(teacher, list(data.train) + eval_paths, budget=cfg.teacher_budget,
                             cache=cfg.teacher_cache, progress=progress)
    targets, teacher_eval = run.embeddings[:len(data.train)], run.embeddings[len(data.train):]
    log(f"teacher {teacher.name}: {run.embeddings.shape[1]}-d, {run.teacher_calls} calls, {run.from_cache} "
        f"from cache; D = {len(data.train)} unlabelled images"
        + ("" if data.eval is None else f"; evaluation on {len(eval_paths)} held-out labelled images"))
    teacher_map = None
    if data.eval is not None:
        labels = np.asarray(data.eval.labels)
        teacher_map = labelled_eval(teacher_eval, labels, teacher_eval, labels, ks=(1,), exclude_self=True).map
    variants = [("main", cfg)] + [(a, replace(cfg, name=a, loss=replace(cfg.loss, **ABLATIONS[a]))) for a in cfg.ablations]
    rows = []
    for name, variant in variants:
        student, history = train_student(variant, data.train, targets, run.embeddings.shape[1], device, progress, log)
        row = {"run": name, "final_loss": history[-1]["loss"] if history else None}
        if data.eval is not None:
            row.update(evaluate_student(student, teacher_eval, data.eval, data.train, variant.eval,
                                        variant.loss.asymmetric, progress))
            row["ratio"] = row["student_map"] / teacher_map
            if "asymmetric_map" in row:
                row["asym_over_teacher"] = row["asymmetric_map"] / teacher_map
        file = out / ("student.safetensors" if name == "main" else f"student_{name}.safetensors")
        space = teacher.space if variant.loss.asymmetric else ""
        save_checkpoint(student, file, CheckpointMeta(embedding_space=space, role="query", name=f"student-{name}",
                                                      extra={k: v for k, v in row.items() if k != "run"}))
        rows.append(row)
        log(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
    results = {"teacher": teacher.name, "teacher_map": teacher_map, "teacher_calls": run.teacher_calls,
               "n_train": len(data.train), "rows": rows, "config": cfg.to_dict()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(_table(rows, teacher_map))
    return results

