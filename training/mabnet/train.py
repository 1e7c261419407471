"""`retrieval-sdk train mabnet`: MABNet gallery training (master/assistant blocks, multi-crop, KL between
their embedding distributions, ArcFace with bounded learnable s and m, weight transfer), its ablations and
lambda sweep in one table, re-ranking rows, and a phone query model distilled into the gallery's space.

Per image, a multi-crop view set (training.transforms.MultiCropTransform): the global crops go to both
blocks, the local crops to the master only; one backbone pass per run of same-size crops. The loss is
  sum over master crops i x assistant global crops j of KL(P_m,i || P_a,j)   (the master as reference, Eq. 2)
  + ArcFace(master crops) + ArcFace(assistant global crops),
P = softmax(L2-normalised embedding / temperature). Each ArcFace reaches only its block; the KL term
trains both. After each epoch (or each step) the master takes theta_m <- lam theta_m + (1 - lam) theta_a.
AdamW with warm-up + cosine, AMP, --device, clipping and exact resume come from training.fit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from sdk.vectors import l2_normalize
from training.checkpoint import CheckpointMeta, save_checkpoint
from training.config import Checked, ConfigError, RunConfig, apply_overrides, check_known, from_dict, to_dict
from training.data import ImageDataset, LabelledImages, load_splits
from training.embed import embed_images
from training.evaluate import format_table, labelled_eval, labelled_eval_scores
from training.heads import Whitening, learn_pca_whitening
from training.fit import FitConfig, OptimConfig, fit
from training.losses import embedding_kl
from training.mabnet.model import MABNet, MABNetError, MABNetModelConfig, descriptor, transfer_weights
from training.models import EmbeddingModel, ModelConfig, new_space_id
from training.transforms import SMALL_IMAGES, MultiCropTransform

Log = Callable[[str], None]
KL_REFERENCES = ("master", "assistant")
TRANSFER_EVERY = ("epoch", "iteration", "none")
# name -> the dotted config overrides that make the row (the ablation flags)
ABLATIONS: dict[str, dict] = {
    "no_transfer": {"transfer.every": "none"},
    "reversed_transfer": {"transfer.target": "assistant"},  # the assistant takes the master's weights
    "no_kl": {"loss.kl_weight": 0.0},
    "assistant_reference": {"loss.kl_reference": "assistant"},  # KL(P_a || P_m)
    "reversed_flow": {"loss.kl_reference": "assistant", "transfer.target": "assistant"},
    "master_only": {"model.assistant": False},  # all crops to the master, no assistant, no KL, no transfer
    "per_iteration": {"transfer.every": "iteration"},  # Algorithm 1 read as a transfer after every step
}


@dataclass(frozen=True)
class CropConfig(Checked):
    """The training views (DINO's multi-crop, the paper's counts): global crops go to both blocks, local
    crops to the master only. `grayscale`, `blur`, `solarize` are DINO's photometric options (probability
    per crop). `small_images`: an image whose short side is below global_size is upscaled to it, or refused."""

    n_global: int = 2  # >= 1: the assistant sees only global crops
    global_size: int = 224
    global_scale: tuple[float, float] = (0.5, 1.0)
    n_local: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.5)
    color_jitter: float = 0.4
    grayscale: float = 0.2
    blur: float = 0.0
    solarize: float = 0.0
    small_images: str = "upscale"
    _where = "crops"
    _checks = {"n_global": ">= 1", "n_local": ">= 0", "small_images": SMALL_IMAGES}


@dataclass(frozen=True)
class MABNetLossConfig(Checked):
    """KL term (temperature of the softmax over the L2-normalised embedding, weight, which block is the
    reference) and the bounded ArcFace heads (initial s and m, and the bounds each stays inside)."""

    temperature: float = 0.1
    kl_weight: float = 1.0
    kl_reference: str = "master"
    arcface_weight: float = 1.0
    arcface_s: float = 30.0
    arcface_m: float = 0.3
    s_bounds: tuple[float, float] = (8.0, 64.0)
    m_bounds: tuple[float, float] = (0.05, 0.6)
    _where = "loss"
    _checks = {"kl_reference": KL_REFERENCES, "temperature": "> 0", "kl_weight arcface_weight": ">= 0"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, v, (lo, hi) in (("arcface_s", self.arcface_s, self.s_bounds), ("arcface_m", self.arcface_m, self.m_bounds)):
            if not 0 <= lo < v < hi:
                raise ConfigError(f"loss.{name}={v} must lie strictly inside its bounds ({lo}, {hi})")


@dataclass(frozen=True)
class TransferConfig(Checked):
    """theta_target <- lam theta_target + (1 - lam) theta_other, after each epoch (the paper's Fig. 1), each
    step, or never; target "master" (the paper) or "assistant" (reversed). The optimiser state (AdamW's
    moments) is kept as it is at a transfer: only the weights move."""

    lam: float = 0.5
    every: str = "epoch"
    target: str = "master"
    _where = "transfer"
    _checks = {"lam": "[0, 1]", "every": TRANSFER_EVERY, "target": KL_REFERENCES}


@dataclass(frozen=True)
class MABNetTrainConfig(Checked):
    """The paper's recipe: AdamW lr 5e-4, weight decay 1e-5, linear warm-up then cosine. `backbone_lr_scale`
    slows the pretrained backbones; `freeze_stem` (CNNs only) keeps the layers below the stride-16 stage
    fixed, about 2x faster on a CPU; `head_init` "pca" starts both FCs (one start for both blocks) from the
    PCA whitening of the pretrained GeM features of the training images instead of a random projection."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-5
    warmup_epochs: float = 1.0
    backbone_lr_scale: float = 1.0
    grad_clip: float | None = 3.0
    freeze_stem: bool = False
    head_init: str = "pca"  # pca: the FC starts as square-rooted PCA whitening of the pretrained GeM features | random
    max_steps: int | None = None  # per epoch (tests, smoke runs)
    _where = "train"
    _checks = {"head_init": ("pca", "random"), "epochs": ">= 1", "batch_size": ">= 2", "lr": "> 0",
               "backbone_lr_scale warmup_epochs": ">= 0"}


@dataclass(frozen=True)
class MABNetEvalConfig:
    """Leave-one-out mAP and R@k on the held-out split; `rerank`: AQE, alpha-QE and diffusion (sdk.rerank)
    rows for the main model; `baseline`: the pretrained backbone + GeM, no training."""

    ks: tuple[int, ...] = (1,)
    batch_size: int = 32
    rerank: bool = True
    baseline: bool = True


@dataclass(frozen=True)
class MABNetConfig(RunConfig, run="mabnet"):
    """One `train mabnet` run: the main MABNet, then each ablation and each lambda of the sweep, one table;
    `query`: a DistillConfig section (its student, epochs ...) to distil a phone query model into the main
    gallery's space (teacher, data and asymmetric mode are set here), None: no query model."""

    model: MABNetModelConfig = field(default_factory=MABNetModelConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    loss: MABNetLossConfig = field(default_factory=MABNetLossConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: MABNetTrainConfig = field(default_factory=MABNetTrainConfig)
    eval: MABNetEvalConfig = field(default_factory=MABNetEvalConfig)
    lambdas: tuple[float, ...] = ()
    query: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_known(self.ablations, sorted(ABLATIONS), "ablation")
        if any(not 0.0 <= lam <= 1.0 for lam in self.lambdas):
            raise ConfigError(f"lambdas must lie in [0, 1], got {list(self.lambdas)}")
        if self.model.image_size not in (None, self.crops.global_size):
            raise ConfigError(f"model.image_size {self.model.image_size} differs from crops.global_size "
                              f"{self.crops.global_size}: the gallery input is the global crop size; set one")


load_mabnet_config = MABNetConfig.load


def variants(cfg: MABNetConfig) -> list[tuple[str, MABNetConfig]]:
    """(row name, its config): the main run, each ablation, each lambda of the sweep other than the main's."""
    base = cfg.to_dict()

    def changed(changes: dict) -> MABNetConfig:
        return from_dict(MABNetConfig, apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in changes.items()]))
    rows = [("mabnet", cfg)] + [(a, changed(ABLATIONS[a])) for a in cfg.ablations]
    rows += [(f"lambda={lam:g}", changed({"transfer.lam": lam})) for lam in cfg.lambdas if lam != cfg.transfer.lam]
    return rows


# ------------------------------------------------------------------------------------------------ model + loss


def build_model(cfg: MABNetConfig) -> MABNet:
    """The two blocks at the global crop size (no classifier heads yet)."""
    return MABNet(replace(cfg.model, image_size=cfg.crops.global_size, mode="master"))


def pairwise_kl(master: Sequence[torch.Tensor], assistant: Sequence[torch.Tensor], temperature: float,
                reference: str = "master") -> torch.Tensor:
    """Sum over master crops x assistant crops of KL(P_ref || P_other), P = softmax(normalise(E) / T); no
    side is detached, so the term trains both blocks."""
    total = torch.zeros((), device=master[0].device)
    for em in master:
        pm = F.normalize(em.float(), dim=-1)
        for ea in assistant:
            pa = F.normalize(ea.float(), dim=-1)
            ref, other = (pm, pa) if reference == "master" else (pa, pm)
            total = total + embedding_kl(other, ref, temperature, detach_teacher=False)
    return total


def mabnet_losses(model: MABNet, crops: Sequence[torch.Tensor], labels: torch.Tensor, cfg: MABNetConfig) -> dict:
    """One batch's terms: crops (globals first, then locals), each (B, 3, h, w). The master embeds every
    crop, the assistant the global ones; same-size crops share one backbone pass."""
    ng, b, lc = cfg.crops.n_global, labels.shape[0], cfg.loss
    globals_ = torch.cat(list(crops[:ng]))
    e_m = [model.master(globals_)] + ([model.master(torch.cat(list(crops[ng:])))] if len(crops) > ng else [])
    e_m = torch.cat(e_m)
    terms = {"arcface_master": model.master_arcface(e_m, labels.repeat(len(crops)))}
    loss = lc.arcface_weight * terms["arcface_master"]
    if model.assistant is not None:
        e_a = model.assistant(globals_)
        terms["arcface_assistant"] = model.assistant_arcface(e_a, labels.repeat(ng))
        terms["kl"] = pairwise_kl(e_m.split(b), e_a.split(b), lc.temperature, lc.kl_reference)
        loss = loss + lc.arcface_weight * terms["arcface_assistant"] + lc.kl_weight * terms["kl"]
    terms["s"], terms["m"] = model.master_arcface.scale.detach(), model.master_arcface.margin.detach()
    terms["loss"] = loss
    return terms


def apply_transfer(model: MABNet, cfg: TransferConfig) -> None:
    """One weight transfer between the blocks, as `cfg` says (nothing for a master-only model)."""
    if model.assistant is None or cfg.every == "none":
        return
    target, source = (model.master, model.assistant) if cfg.target == "master" else (model.assistant, model.master)
    transfer_weights(target, source, cfg.lam)


# ------------------------------------------------------------------------------------------------ training


def run_key(cfg: MABNetConfig, n_images: int, n_classes: int) -> str:
    """What one row's training is: everything but naming, evaluation, the other rows and the query model."""
    d = cfg.to_dict()
    for k in ("name", "out", "eval", "ablations", "lambdas", "query"):
        d.pop(k)
    d["model"].pop("mode")
    d["model"].pop("gallery")
    return json.dumps([d, n_images, n_classes], sort_keys=True)


def check_resume_classes(run_dir: Path, n_classes: int) -> None:
    """An interrupted run of another class count cannot be resumed: its ArcFace heads have other rows."""
    path = run_dir / "last.pt"
    if not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    weight = state.get("modules", {}).get("model", {}).get("master_arcface.weight")
    if weight is not None and weight.shape[0] != n_classes:
        raise MABNetError(f"{path} was trained with {weight.shape[0]} classes but this data has {n_classes}; "
                          f"delete {run_dir} or pass another --out to start afresh")


@torch.no_grad()
def init_fc_pca(model: MABNet, data: LabelledImages, progress: bool = True) -> None:
    """Both blocks' FC := square-rooted PCA whitening (power 0.25) of the pretrained GeM features of `data`
    (heads.learn_pca_whitening, as a heads.Whitening FC), so training starts from a PCA-whitened baseline."""
    block = model.master
    feats = embed_images(lambda x: block.pool(block.backbone(x)), data.paths, model.spec, desc="FC init (PCA)",
                         progress=progress)
    dim = block.fc.out_features
    if dim > min(feats.shape[0] - 1, feats.shape[1]):
        raise MABNetError(f"train.head_init='pca' needs more than model.dim={dim} training images and pooled "
                          f"channels (got {feats.shape[0]} images, {feats.shape[1]} channels); use head_init='random'")
    fc = Whitening.from_pca(*learn_pca_whitening(feats, dim, power=0.25)).fc
    for b in model.blocks:
        b.fc.load_state_dict(fc.state_dict())


def _stem_trunks(model: MABNet):
    from training.extractors.base import Trunk

    if model.master.backbone.config.kind != "cnn":
        raise MABNetError(f"train.freeze_stem needs a CNN backbone (it freezes the layers below the stride-16 stage); "
                          f"{model.config.backbone} is a ViT: set train.freeze_stem=false")
    return [Trunk(block.backbone).set_freeze_stem(True) for block in model.blocks]


def train_mabnet(cfg: MABNetConfig, row: str, data: LabelledImages, device: str = "cpu", progress: bool = True,
                 log: Log | None = print) -> tuple[MABNet, list[dict]]:
    """Train one row on `data` (checkpointed under out/runs/<row>, resumed when there)."""
    torch.manual_seed(cfg.seed)
    n_classes = len(data.classes)
    run_dir = Path(cfg.out) / "runs" / row
    check_resume_classes(run_dir, n_classes)
    model = build_model(cfg)
    lc, t = cfg.loss, cfg.train
    if t.head_init == "pca" and not (run_dir / "last.pt").is_file():  # a resumed run loads its weights
        init_fc_pca(model, data, progress)
    model.set_classes(n_classes, lc.arcface_s, lc.arcface_m, lc.s_bounds, lc.m_bounds)
    transform = MultiCropTransform(model.spec, seed=cfg.seed, **asdict(cfg.crops))  # CropConfig: its fields by name
    if len(data) < t.batch_size:
        raise MABNetError(f"{len(data)} training images are fewer than train.batch_size={t.batch_size}; lower it")
    loader = DataLoader(ImageDataset(data, transform), batch_size=t.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    trunks = _stem_trunks(model) if t.freeze_stem else []
    backbone_ids = {id(p) for block in model.blocks for p in block.backbone.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) in backbone_ids and p.requires_grad],
               "lr": t.lr * t.backbone_lr_scale},
              {"params": [p for p in model.parameters() if id(p) not in backbone_ids], "lr": t.lr}]

    def modes(epoch: int) -> None:
        model.train()
        for trunk in trunks:
            trunk.train()  # the frozen stem's BatchNorm statistics stay fixed

    per_epoch = len(loader) if t.max_steps is None else min(len(loader), t.max_steps)
    every = cfg.transfer.every
    history = fit(lambda b: mabnet_losses(model, b[0], b[1], cfg), loader, {"model": model}, groups,
                  OptimConfig("adamw", weight_decay=t.weight_decay, warmup_steps=round(t.warmup_epochs * per_epoch)),
                  FitConfig(epochs=t.epochs, max_steps=t.max_steps, device=device, grad_clip=t.grad_clip, seed=cfg.seed,
                            channels_last=model.master.backbone.config.kind == "cnn", checkpoint_dir=run_dir,
                            run_key=run_key(cfg, len(data), n_classes), desc=f"mabnet {row}", progress=progress),
                  on_epoch_start=modes,
                  after_step=(lambda: apply_transfer(model, cfg.transfer)) if every == "iteration" else None,
                  on_epoch_end=(lambda e: apply_transfer(model, cfg.transfer)) if every == "epoch" else None, log=log)
    for trunk in trunks:
        trunk.set_freeze_stem(False)
    model.set_classes(None)  # the heads were for training: the saved model is the gallery descriptor alone
    return model.cpu().eval(), history


# ------------------------------------------------------------------------------------------------ evaluation


def _scores(emb: np.ndarray, labels: np.ndarray, ks: Sequence[int]) -> dict:
    r = labelled_eval(emb, labels, emb, labels, ks=ks, exclude_self=True)
    return {"map": r.map, **{f"recall@{k}": v for k, v in r.recall.items()}}


def evaluate_row(model: MABNet, data: LabelledImages, cfg: MABNetConfig, progress: bool) -> tuple[dict, dict]:
    """(figures, descriptors) on the held-out images: MABNet (the master over the gallery crops), the master on
    the original alone (the descriptor's first block renormalised: the same numbers as an original-only
    layout) and MABNet(C) (master and assistant descriptors concatenated, as the combined mode computes)."""
    labels, ks, layout, dim = np.asarray(data.labels), cfg.eval.ks, cfg.model.gallery, cfg.model.dim

    def run(block, what: str) -> np.ndarray:
        return embed_images(lambda x: descriptor(block, x, layout), data.paths, model.spec,
                            batch_size=cfg.eval.batch_size, desc=f"{what} descriptors", progress=progress)
    emb = {"master": run(model.master, "master")}
    row = {**_scores(emb["master"], labels, ks), "dim": int(emb["master"].shape[1]),
           "map_original": _scores(l2_normalize(emb["master"][:, :dim]), labels, ks)["map"]}
    if model.assistant is not None:
        emb["combined"] = l2_normalize(np.concatenate([emb["master"], run(model.assistant, "assistant")], axis=1))
        row["map_combined"] = _scores(emb["combined"], labels, ks)["map"]
    return row, emb


def rerank_rows(emb: dict, labels: np.ndarray, ks: Sequence[int]) -> list[dict]:
    """AQE, alpha-QE and diffusion (sdk.rerank, its default settings) on each descriptor, leave-one-out."""
    from sdk.rerank import Diffusion, RerankConfig, aqe, alpha_qe

    rc = RerankConfig()
    rows = []
    for method in ("aqe", "alpha_qe", "diffusion"):
        row = {"run": f"mabnet + {method}"}
        for mode, e in emb.items():
            if method == "diffusion":
                scores = Diffusion(e, rc.diffusion).rank_scores(e, exclude_self=True)
                r = labelled_eval_scores(scores, labels, labels, ks=ks, exclude_self=True)
            else:
                q = aqe(e, e, rc.qe_k, exclude_self=True) if method == "aqe" else \
                    alpha_qe(e, e, rc.alpha_qe_k, rc.alpha, exclude_self=True)
                r = labelled_eval(q, labels, e, labels, ks=ks, exclude_self=True)
            row["map" if mode == "master" else "map_combined"] = r.map
            if mode == "master":
                row.update({f"recall@{k}": v for k, v in r.recall.items()})
        rows.append(row)
    return rows


def baseline_row(cfg: MABNetConfig, data: LabelledImages, progress: bool) -> dict:
    """The pretrained backbone + GeM at the global crop size, the original image only, no training."""
    m = cfg.model
    model = EmbeddingModel(ModelConfig(m.backbone, "gem", gem_p=m.gem_p, input_size=cfg.crops.global_size),
                           pretrained=m.pretrained)
    emb = embed_images(model, data.paths, model.spec, batch_size=cfg.eval.batch_size, desc="baseline", progress=progress)
    return {"run": "pretrained + GeM (no training)", **_scores(emb, np.asarray(data.labels), cfg.eval.ks),
            "dim": int(emb.shape[1])}


_COLUMNS = [(key, title, 11, ".2f", scale) for key, title, scale in (
    ("map_original", "orig-only", 100), ("map", "MABNet", 100), ("map_combined", "MABNet(C)", 100),
    ("recall@1", "R@1", 100), ("s", "s", 1), ("m", "m", 1), ("seconds", "train s", 1), ("final_loss", "loss", 1))]


def table(rows: list[dict]) -> str:
    """One line per row: mAP of the master on the original only, MABNet (master over the gallery crops),
    MABNet(C), R@1 of MABNet (all %), the final ArcFace s and m, training seconds and final loss."""
    return format_table(rows, _COLUMNS, "row", 32)


# ------------------------------------------------------------------------------------------------ query model


def query_config(cfg: MABNetConfig, gallery: Path):
    """The `query` section as a `train distill` config (asymmetric mode, the MABNet gallery as the teacher,
    the same data). Building it checks the section, so run_mabnet does so before any training."""
    from training.distill import ABLATIONS as DISTILL_MODES, DistillConfig

    section = {"name": "query", "out": str(Path(cfg.out) / "query"), **(cfg.query or {}),
               "teacher": str(gallery), "data": to_dict(cfg.data), "ablations": []}
    section["loss"] = {**section.get("loss", {}), **DISTILL_MODES["asymmetric"]}
    return from_dict(DistillConfig, section, "query")


def distil_query(cfg: MABNetConfig, gallery: Path, device: str, progress: bool, log: Log) -> dict:
    """A phone query model distilled into the gallery's space by `train distill`; returns its figures."""
    from training.distill import run_distill

    dcfg = query_config(cfg, gallery)
    res = run_distill(dcfg, device=device, progress=progress, log=log)
    row = res["rows"][0]
    return {"student": dcfg.student.backbone, "teacher_map": res["teacher_map"], "asymmetric_map": row.get("asymmetric_map"),
            "symmetric_map": row.get("student_map"), "file": str(Path(dcfg.out) / "student.safetensors")}


# ------------------------------------------------------------------------------------------------ the run


def run_mabnet(cfg: MABNetConfig, device: str = "cpu", progress: bool = True, log: Log | None = print) -> dict:
    """The whole run (see the module docstring); returns what results.json holds."""
    if cfg.query is not None:
        query_config(cfg, Path(cfg.out) / "mabnet.safetensors")  # a bad query section fails before any work
    log = log or (lambda _: None)
    t0 = time.perf_counter()
    out = cfg.start(device)
    splits = load_splits(cfg)
    log(splits.description)
    c, m = cfg.crops, cfg.model
    log(f"model: 2 x {m.backbone} + GeM + FC {m.dim}-d; crops {c.n_global} x {c.global_size} px + {c.n_local} x "
        f"{c.local_size} px; gallery layout {m.gallery.n_global} global + {m.gallery.n_local} local; "
        f"{cfg.train.epochs} epochs of {len(splits.train) // cfg.train.batch_size} steps")
    rows: list[dict] = []
    if cfg.eval.baseline:
        rows.append(baseline_row(cfg, splits.eval, progress))
    space = new_space_id("mabnet")
    labels = np.asarray(splits.eval.labels)
    main_file = out / "mabnet.safetensors"
    for name, variant in variants(cfg):
        start, resumed = time.perf_counter(), (out / "runs" / name / "last.pt").is_file()
        model, history = train_mabnet(variant, name, splits.train, device, progress, log)
        seconds = time.perf_counter() - start
        figures, emb = evaluate_row(model, splits.eval, variant, progress)
        last = history[-1] if history else {}
        row = {"run": name, **figures, "seconds": seconds, "resumed": resumed, "final_loss": last.get("loss"),
               "s": last.get("s"), "m": last.get("m")}
        rows.append(row)
        if name == "mabnet":
            row["run"] = f"mabnet (lambda={cfg.transfer.lam:g}, per {cfg.transfer.every})"
            model.with_view("master")
            save_checkpoint(model, main_file, CheckpointMeta(embedding_space=space, role="gallery", name="mabnet",
                                                             extra={k: v for k, v in row.items() if k != "run"}))
            if model.assistant is not None:
                save_checkpoint(model.with_view("combined"), out / "mabnet_combined.safetensors",
                                CheckpointMeta(embedding_space=new_space_id("mabnet-c"), role="gallery", name="mabnet-c"))
            if cfg.eval.rerank:
                rows += rerank_rows(emb, labels, cfg.eval.ks)
        else:
            save_checkpoint(model.with_view("master"), out / "runs" / name / "mabnet.safetensors",
                            CheckpointMeta(embedding_space=new_space_id("mabnet"), role="gallery", name=f"mabnet-{name}"))
        log(f"{name}: MABNet mAP {row['map'] * 100:.2f}" + (f", MABNet(C) {row['map_combined'] * 100:.2f}"
                                                           if "map_combined" in row else "") + f" ({seconds:.0f} s)")
    query = distil_query(cfg, main_file, device, progress, log) if cfg.query is not None else None
    results = {"data": splits.description, "n_train": len(splits.train), "n_eval": len(splits.eval), "rows": rows,
               "query": query, "seconds": time.perf_counter() - t0, "config": cfg.to_dict()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(splits.description)
    log(table(rows))
    if query is not None:
        log(f"query model ({query['student']}, distilled into the MABNet gallery's space): asymmetric mAP "
            f"{query['asymmetric_map'] * 100:.2f}, symmetric mAP {query['symmetric_map'] * 100:.2f}, gallery "
            f"(teacher) mAP {query['teacher_map'] * 100:.2f}; asym/sym {query['asymmetric_map'] / query['symmetric_map']:.3f}")
    log(f"wrote {main_file} and {out / 'results.json'} in {results['seconds']:.0f} s")
    return results
