"""The one training loop: `fit(step, data, modules, param_groups, OptimConfig, FitConfig)`.

Every trainer (gallery extractors, AFF mixer warm-up and joint training, the compatibility fine-tune;
next rank distillation and MABNet) is a `step(batch) -> {"loss": ..., other logged terms}` on it:

    fit(lambda b: {"loss": arcface(model(b[0]), b[1])}, loader, {"model": model, "arcface": arcface},
        [{"params": params, "lr": 1e-3}], OptimConfig("adamw"), FitConfig(epochs=3, device="cuda"))

The loop owns device placement (cpu|cuda|mps), AMP on CUDA, the optimiser and the one cosine schedule,
gradient clipping, one non-finite-loss error, tqdm with loss and throughput, and periodic checkpoints
with exact resume (modules, optimiser, schedule, scaler, history, RNG states; the finished steps' data
is replayed, so `data` must be deterministic given its seeds). Plain torch (see docs/design.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sized

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sdk.bundle import save_atomic
from training.config import Checked
from training.errors import TrainingError

DEVICES = ("cpu", "cuda", "mps")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant", "exp")
FIT_STATE_FORMAT = "retrieval-sdk/fit-state"
StepFn = Callable[[Any], Mapping[str, Tensor]]


class FitError(TrainingError):
    """A training run that cannot start or go on: bad device, empty data, a foreign checkpoint."""


class NonFiniteLossError(FitError):
    """The loss became NaN or infinite: the one error every trainer raises for it."""


@dataclass(frozen=True)
class OptimConfig(Checked):
    """Optimiser and schedule; learning rates travel in the param groups (one per group)."""

    name: str = "adamw"  # adamw | adam (L2 weight decay, as rank distillation's paper) | sgd
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine (to 0 over the run) | constant | exp (lr * exp(-exp_decay * epoch))
    exp_decay: float = 0.01  # exp only: the paper's l0 * exp(-0.01 * epoch)
    warmup_steps: int = 0  # cosine only: linear warm-up from 0 over these steps, then the cosine over the rest
    _where, _error = "optimizer", FitError
    _checks = {"name": OPTIMIZERS, "schedule": SCHEDULES, "warmup_steps": ">= 0"}


@dataclass(frozen=True)
class FitConfig(Checked):
    """How to run the loop. `max_steps` caps the steps of each epoch (tests and smoke runs);
    checkpoints go to `checkpoint_dir` every `checkpoint_every` steps and at each epoch end."""

    epochs: int = 1
    max_steps: int | None = None
    device: str = "cpu"
    amp: bool = True  # mixed precision, on CUDA only
    grad_clip: float | None = None  # max global gradient norm
    seed: int | None = None  # seed torch/python/numpy at the start (None: the caller seeded)
    channels_last: bool = False  # convolution nets train ~2x faster on CPU in NHWC
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0
    resume: bool = True  # continue from checkpoint_dir/last.pt when it is there
    run_key: str = ""  # what the run is (a config hash): a checkpoint of another run is refused
    desc: str = "train"
    progress: bool = True
    _where, _error = "fit", FitError
    _checks = {"epochs checkpoint_every": ">= 0", "max_steps": ">= 1 or null", "grad_clip": "> 0 or null"}


@dataclass(frozen=True)
class Checkpoints:
    """Where a multi-stage run keeps each stage's last.pt: root/<stage>-<hash of what the stage is>, so a
    changed config trains into a folder of its own instead of hitting another run's checkpoint."""

    root: Path
    resume: bool = True  # False: every stage starts afresh (and overwrites its folder)
    every: int = 50  # steps between checkpoints, besides each epoch's end

    def stage(self, name: str, key: object) -> dict:
        """FitConfig arguments for the stage `name` whose settings and data are `key` (JSON-able)."""
        text = json.dumps(key, sort_keys=True, default=str)
        folder = self.root / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        return {"checkpoint_dir": folder, "run_key": text, "resume": self.resume, "checkpoint_every": self.every}


def stage_fit(checkpoints: "Checkpoints | None", name: str, key: object) -> dict:
    """`Checkpoints.stage`, or no checkpointing when the caller passed none (a stage run on its own)."""
    return {} if checkpoints is None else checkpoints.stage(name, key)


def resolve_device(name: str | torch.device) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device, with a one-line error when it is not here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICES:
        raise FitError(f"device must be one of {DEVICES}, got {str(name)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FitError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FitError(f"--device {name}: Apple MPS is not available here; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python's `random` and numpy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (with momentum) over `param_groups`, each group carrying its own lr."""
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(param_groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)


def build_schedule(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                   steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """The one learning-rate schedule: cosine from each group's lr to 0 over `total_steps` (after a linear
    warm-up of `warmup_steps`), constant, or exp (each group's lr times exp(-exp_decay * epoch), stepped
    once per epoch)."""
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if cfg.schedule == "exp":
        per = max(1, steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: math.exp(-cfg.exp_decay * (s // per)))
    warm = min(cfg.warmup_steps, max(0, total_steps - 1))
    total = max(1, total_steps - warm)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * min(s - warm, total) / total))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor of a (nested tuple/list/dict) batch to `device`; 4-d float tensors to NHWC."""
    if isinstance(batch, Tensor):
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def _rows(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    while not isinstance(batch, Tensor):
        batch = next(iter(batch.values() if isinstance(batch, dict) else batch))
    return len(batch)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _autocast(device: torch.device, enabled: bool) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler]:
    """Mixed precision on CUDA: bf16 where supported (no scaler needed), else fp16 with a scaler."""
    if not (enabled and device.type == "cuda"):
        return contextlib.nullcontext(), torch.amp.GradScaler("cuda", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def _load_state(cfg: FitConfig) -> dict | None:
    """The checkpoint to resume from (checkpoint_dir/last.pt), refused when another run wrote it."""
    path = Path(cfg.checkpoint_dir or "", "last.pt")
    if not (cfg.checkpoint_dir and cfg.resume and path.is_file()):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FIT_STATE_FORMAT or state.get("run_key") != cfg.run_key:
        raise FitError(f"{path} is the checkpoint of another run (config changed?); delete {path.parent} or pass "
                       "another checkpoint folder to start afresh")
    return state


def fit(step: StepFn, data: Sized, modules: Mapping[str, nn.Module], param_groups: list[dict],
        optim: OptimConfig, cfg: FitConfig, *, on_epoch_start: Callable[[int], None] | None = None,
        after_step: Callable[[], None] | None = None, on_epoch_end: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = print) -> list[dict[str, float]]:
    """Train `modules` (all moved to cfg.device; their state is what checkpoints hold) by minimising
    `step(batch)["loss"]` over `data`, one pass per epoch; return each epoch's mean of every logged term.

    on_epoch_start(epoch): set train/eval modes (default: every module in train mode);
    after_step(): runs after each optimiser step (e.g. a momentum update of a buffer);
    on_epoch_end(epoch): runs after each epoch's last step, before its checkpoint (e.g. keep its weights).
    """
    device = resolve_device(cfg.device)
    if cfg.seed is not None:
        seed_everything(cfg.seed)
    per_epoch = len(data) if cfg.max_steps is None else min(len(data), cfg.max_steps)
    if per_epoch < 1 and cfg.epochs:
        raise FitError(f"{cfg.desc}: the training data yields no batch (too few samples for the batch size?)")
    for m in modules.values():
        m.to(device=device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    opt = build_optimizer(param_groups, optim)
    sched = build_schedule(opt, optim, per_epoch * cfg.epochs, per_epoch)
    autocast, scaler = _autocast(device, cfg.amp)
    params = [p for g in opt.param_groups for p in g["params"]]
    state = _load_state(cfg)
    history, sums, done = [], {}, 0  # done: steps finished before this call (resume)
    if state is not None:
        for name, m in modules.items():
            m.load_state_dict(state["modules"][name])
        for part, obj in (("optimizer", opt), ("scheduler", sched), ("scaler", scaler)):
            obj.load_state_dict(state[part])
        history, sums, done = state["history"], state["epoch_sums"], state["step"]
        if log:
            log(f"  {cfg.desc}: resuming from {cfg.checkpoint_dir}/last.pt at step {done}")
    step_no = 0
    for epoch in range(cfg.epochs):
        # Steps before `done` are replayed (their data iterated, not computed), then the RNGs are set to
        # the checkpoint's. Every pass iterates the same way, so seeded samplers and augmentations use
        # their RNGs identically: tqdm over the data, to its end (a sampler draws there) or max_steps + 1.
        bar = tqdm(data, total=per_epoch, desc=f"{cfg.desc} epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not cfg.progress, leave=False)
        (on_epoch_start or (lambda e: [m.train() for m in modules.values()]))(epoch)
        t0, seen = time.perf_counter(), 0
        for i, batch in enumerate(bar):
            if i >= per_epoch:
                break
            if step_no < done:
                step_no += 1
                if step_no == done:
                    _set_rng_state(state["rng"])
                continue
            batch = to_device(batch, device, cfg.channels_last)
            with autocast:
                terms = step(batch)
            loss = terms["loss"]
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(f"{cfg.desc}: loss became {loss.item()} at step {step_no + 1} (epoch "
                                         f"{epoch + 1}); lower the learning rate or set a gradient clip")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if after_step is not None:
                after_step()
            step_no += 1
            for k, v in terms.items():
                sums.setdefault(k, []).append(float(v.detach()))
            seen += _rows(batch)
            bar.set_postfix(loss=f"{sums['loss'][-1]:.3f}", samples_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if i == per_epoch - 1:
                history.append({k: float(np.mean(v)) for k, v in sums.items()})
                sums = {}
                if on_epoch_end is not None:
                    on_epoch_end(epoch)
            every = cfg.checkpoint_every
            if cfg.checkpoint_dir and (i == per_epoch - 1 or (every and step_no % every == 0)):
                save_atomic({"format": FIT_STATE_FORMAT, "run_key": cfg.run_key, "step": step_no, "history": history,
                             "epoch_sums": sums, "rng": _rng_state(), "optimizer": opt.state_dict(),
                             "modules": {n: m.state_dict() for n, m in modules.items()},
                             "scheduler": sched.state_dict(), "scaler": scaler.state_dict()},
                            Path(cfg.checkpoint_dir, "last.pt"), torch.save)
        bar.close()
        if log and seen:
            sec = time.perf_counter() - t0
            log(f"  {cfg.desc} epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items())
                + f" ({sec:.0f} s, {seen / sec:.0f} samples/s)")
    for m in modules.values():
        m.to(memory_format=torch.contiguous_format).eval()
    return history
