"""The one training loop: resume after an interruption, device handling, AMP on CUDA, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import training  # noqa: F401
from training.fit import (FitConfig, FitError, NonFiniteLossError, OptimConfig, build_schedule, fit,
                          resolve_device)


class Interrupted(Exception):
    pass


def _setup(seed: int = 0):
    """A small net with dropout (global RNG) on a shuffled, seeded loader: every random stream is in play."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    loader = DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return model, loader


def _run(tmp, interrupt_at: int | None = None, every: int = 2, epochs: int = 3):
    model, loader = _setup()
    calls = {"n": 0}

    def step(batch):
        calls["n"] += 1
        if interrupt_at is not None and calls["n"] == interrupt_at:
            raise Interrupted
        x, y = batch
        return {"loss": nn.functional.cross_entropy(model(x), y)}

    logs: list[str] = []
    history = fit(step, loader, {"model": model}, [{"params": list(model.parameters()), "lr": 0.1}],
                  OptimConfig("adamw"), FitConfig(epochs=epochs, checkpoint_dir=tmp, checkpoint_every=every,
                                                  progress=False), log=logs.append)
    return model, history, logs, calls["n"]


def test_resume_after_interruption_continues_from_last_checkpoint_and_ends_with_the_same_weights(tmp_path):
    ref, ref_history, _, _ = _run(tmp_path / "ref")
    with pytest.raises(Interrupted):
        _run(tmp_path / "cut", interrupt_at=8)  # steps 1..7 done; last checkpoint at step 6 (mid epoch 2)
    resumed, history, logs, calls = _run(tmp_path / "cut")
    assert any("resuming" in line and "step 6" in line for line in logs), logs
    assert calls == 12 - 6  # 4 steps per epoch x 3 epochs; only the steps after the checkpoint ran
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert history == ref_history and len(history) == 3


def test_resume_from_a_checkpoint_at_an_epoch_end(tmp_path):
    ref, _, _, _ = _run(tmp_path / "ref", every=0)
    with pytest.raises(Interrupted):
        _run(tmp_path / "cut", interrupt_at=6, every=0)  # epoch 1 done (checkpoint), interrupted in epoch 2
    resumed, _, logs, calls = _run(tmp_path / "cut", every=0)
    assert calls == 8 and any("step 4" in line for line in logs)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()))


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    _run(tmp_path / "ck", epochs=1)
    model, loader = _setup()
    with pytest.raises(FitError, match="another run"):
        fit(lambda b: {"loss": model(b[0]).sum()}, loader, {"model": model},
            [{"params": list(model.parameters()), "lr": 0.1}], OptimConfig(),
            FitConfig(epochs=1, checkpoint_dir=tmp_path / "ck", run_key="other", progress=False), log=None)


def test_non_finite_loss_is_one_clear_error():
    model, loader = _setup()
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 1.*lower the learning rate"):
        fit(lambda b: {"loss": model(b[0]).sum() * float("nan")}, loader, {"model": model},
            [{"params": list(model.parameters()), "lr": 0.1}], OptimConfig(), FitConfig(progress=False), log=None)


def test_gradient_clipping_bounds_the_gradient_norm():
    model, loader = _setup()
    norms = []
    params = list(model.parameters())
    after = lambda: norms.append(float(torch.norm(torch.stack([p.grad.norm() for p in params]))))  # noqa: E731
    fit(lambda b: {"loss": 1e3 * nn.functional.cross_entropy(model(b[0]), b[1])}, loader, {"model": model},
        [{"params": params, "lr": 0.01}], OptimConfig("sgd"), FitConfig(grad_clip=0.5, progress=False),
        after_step=after, log=None)
    assert norms and max(norms) <= 0.5 + 1e-5


def test_cosine_schedule_goes_from_lr_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, OptimConfig("sgd"), total_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])


def test_warmup_rises_linearly_then_the_cosine_runs_over_the_rest():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, OptimConfig("sgd", warmup_steps=2), total_steps=6)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 0.8535534, 0.5, 0.1464466, 0.0])
    with pytest.raises(FitError, match="warmup_steps"):
        OptimConfig(warmup_steps=-1)


def test_exp_schedule_decays_once_per_epoch():
    """Rank distillation's l0 * exp(-0.01 * epoch): constant within an epoch, one decay step per epoch."""
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, OptimConfig("adam", schedule="exp", exp_decay=0.5), total_steps=6, steps_per_epoch=2)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 1.0, math.exp(-0.5), math.exp(-0.5), math.exp(-1.0), math.exp(-1.0)])
    assert isinstance(opt, torch.optim.Adam)


def test_bad_or_absent_device_is_a_one_line_error():
    with pytest.raises(FitError, match="device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(FitError, match="CUDA is not available here.*--device cpu"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_without_a_gpu_is_one_line_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from sdk.cli import app

    for args in (["train", "aff", "--out", str(tmp_path / "aff")], ["quickstart", "--out", str(tmp_path / "qs")]):
        result = CliRunner().invoke(app, [*args, "--device", "cuda", "--no-progress"], catch_exceptions=False)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "CUDA is not available here" in lines[0], result.output
        assert not (tmp_path / "aff" / "data").exists()  # refused before any work


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_one_training_step_on_cuda_with_mixed_precision():
    model, loader = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    history = fit(lambda b: {"loss": nn.functional.cross_entropy(model(b[0]), b[1])}, loader, {"model": model},
                  [{"params": list(model.parameters()), "lr": 0.1}], OptimConfig(),
                  FitConfig(device="cuda", max_steps=1, progress=False), log=None)
    assert next(model.parameters()).device.type == "cuda" and len(history) == 1
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, model.parameters()))
