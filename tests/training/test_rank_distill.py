"""Rank distillation's loss pieces: the soft-binned AP against the exact AP, its gradients at ties and
with empty positive sets, one lambda per mixing, symmetric mixup labels, and mixed rows without gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.losses import listwise_ap_loss, soft_binned_ap
from training.rank_distill import (
    RankDistillConfig,
    average_weights,
    distill_loss,
    mix,
    mixup_labels,
    similarity_labels,
)


def exact_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Non-interpolated AP of the ranking by descending score: mean precision at each positive."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(bool)
    ranks = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def test_soft_ap_tends_to_the_exact_ap_as_bins_get_finer():
    """Scores on a grid of step 0.01 (no ties): once the bins are that fine every item sits alone at a bin
    centre and the soft AP is the exact AP; coarser bins share items and err more the coarser they are.
    (Between bin centres an item's mass is split over two bins, which biases precision down a little:
    about 0.016 AP on continuous random scores, whatever the bin count; documented in docs/distill.md.)"""
    rng = np.random.default_rng(0)
    grid = np.round(np.linspace(-1, 1, 201), 10)
    scores = np.stack([rng.choice(grid, size=40, replace=False) for _ in range(6)])
    labels = rng.random((6, 40)) < 0.3
    labels[:, 0] = True
    exact = np.array([exact_ap(s, y) for s, y in zip(scores, labels)])
    errors = []
    for bins in (6, 11, 41, 201, 401):
        soft = soft_binned_ap(torch.tensor(scores), torch.tensor(labels), n_bins=bins).numpy()
        errors.append(float(np.abs(soft - exact).max()))
    assert errors[-1] < 1e-5 and errors[-2] < 1e-5, errors
    assert errors[0] > errors[1] > errors[2] > errors[3], errors


def test_perfect_and_reversed_rankings():
    scores = torch.linspace(1, -1, 10)[None]
    labels = torch.zeros(1, 10, dtype=torch.bool)
    labels[0, :3] = True
    assert soft_binned_ap(scores, labels, n_bins=1000).item() == pytest.approx(1.0, abs=1e-3)
    rev = soft_binned_ap(-scores, labels, n_bins=1000).item()
    assert rev == pytest.approx(exact_ap(-scores[0].numpy(), labels[0].numpy()), abs=5e-3)


def test_gradients_are_finite_with_ties_and_empty_positive_sets():
    scores = torch.full((3, 8), 0.25, requires_grad=True)  # every score tied
    labels = torch.zeros(3, 8, dtype=torch.bool)
    labels[0, 2] = True  # query 1 and 2 have no positive: masked
    loss = listwise_ap_loss(scores, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert scores.grad[1:].abs().sum() == 0  # masked queries give no gradient
    empty = torch.rand(4, 5, requires_grad=True)
    loss = listwise_ap_loss(empty, torch.zeros(4, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(empty.grad).all()
    with pytest.raises(ValueError, match="mask must be"):
        soft_binned_ap(scores, labels, mask=torch.ones(2, 2, dtype=torch.bool))


def test_mix_renormalises_and_labels_stay_symmetric():
    torch.manual_seed(0)
    t = F.normalize(torch.randn(12, 16), dim=-1)
    t[1] = F.normalize(t[0] + 0.05 * torch.randn(16), dim=-1)  # a near-duplicate pair: positives
    partner = torch.randperm(12)
    joint = torch.cat([t, mix(t, partner, 0.3)])
    assert torch.allclose(joint.norm(dim=-1), torch.ones(24), atol=1e-6)
    sim = similarity_labels(joint, 0.75)
    y = mixup_labels(sim, partner)
    assert torch.equal(y, y.T)
    assert bool((y | ~sim).all())  # mixup labelling only adds positives
    for k in range(12):  # a mixed sample is a positive of its two constituents and of their positives
        assert y[12 + k, k] and y[12 + k, partner[k]]
        assert bool((y[12 + k, :12] >= sim[k, :12]).all()) and bool((y[12 + k, :12] >= sim[partner[k], :12]).all())
    with pytest.raises(ValueError, match="must be \\(2B, 2B\\)"):
        mixup_labels(sim[:10, :10], partner)


def test_one_lambda_per_mixing_and_r_mixings(monkeypatch):
    calls = []
    import training.rank_distill as rd

    real_mix = rd.mix

    def spy(x, partner, lam):
        calls.append(float(lam))
        return real_mix(x, partner, lam)

    monkeypatch.setattr(rd, "mix", spy)
    s = torch.randn(8, 6, requires_grad=True)
    t = torch.randn(8, 10)
    distill_loss(s, t, RankDistillConfig(mix_iterations=3, tau=0.2), np.random.default_rng(1))
    assert len(calls) == 6  # teacher and student mixed once per mixing, R = 3
    assert calls[0::2] == calls[1::2]  # the same lambda for teacher and student, one per batch-mixing
    assert len(set(calls[0::2])) == 3


def test_the_ablation_sends_gradient_through_the_mixed_rows():
    """Same seed, same batch: detaching the mixed rows changes the student's gradient (it is a real switch)."""
    t = torch.randn(10, 12)
    grads = []
    for detach in (True, False):
        s = torch.randn(10, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
        loss, _ = distill_loss(s, t, RankDistillConfig(mix_iterations=1, tau=0.0, detach_mixed=detach),
                               np.random.default_rng(0))
        loss.backward()
        grads.append(s.grad)
    assert torch.isfinite(grads[0]).all() and not torch.allclose(grads[0], grads[1])


def test_detached_mixed_rows_have_no_path_to_the_student():
    s = torch.randn(6, 4, requires_grad=True)
    partner = torch.randperm(6)
    from training.rank_distill import _joint

    joint = _joint(s, partner, 0.4, detach=True)
    (g,) = torch.autograd.grad(joint[6:].sum() + 0 * joint[:6].sum(), s, allow_unused=False)
    assert g.abs().sum() == 0
    joint = _joint(s, partner, 0.4, detach=False)
    (g,) = torch.autograd.grad(joint[6:].sum(), s)
    assert g.abs().sum() > 0


def test_loss_falls_when_the_student_copies_the_teacher_ranking():
    rng = np.random.default_rng(3)
    t = F.normalize(torch.randn(16, 8), dim=-1)
    t[8:] = F.normalize(t[:8] + 0.1 * torch.randn(8, 8), dim=-1)  # 8 pairs of near-duplicates
    cfg = RankDistillConfig(mix_iterations=2)
    good, _ = distill_loss(t @ torch.eye(8), t, cfg, rng)  # a student that is the teacher
    bad, _ = distill_loss(F.normalize(torch.randn(16, 8), dim=-1), t, cfg, rng)
    assert good < bad


def test_asymmetric_mode_needs_equal_dims_and_config_errors():
    with pytest.raises(ValueError, match="dims must match"):
        distill_loss(torch.randn(4, 8), torch.randn(4, 16), RankDistillConfig(cross_weight=1.0),
                     np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"loss.tau must be in \(-1, 1\), got 1.5"):
        RankDistillConfig(tau=1.5)
    with pytest.raises(ValueError, match="at least one of"):
        RankDistillConfig(symmetric_weight=0.0)
    loss, stats = distill_loss(torch.randn(6, 8, requires_grad=True), torch.randn(6, 8),
                               RankDistillConfig(cross_weight=1.0, pull_weight=0.5, mix_iterations=2),
                               np.random.default_rng(0))
    assert torch.isfinite(loss) and stats["positives_per_query"] >= 0


def test_weight_averaging_of_two_epochs():
    a = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    b = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    b[1].num_batches_tracked += 7
    avg = average_weights([a.state_dict(), b.state_dict()])
    torch.testing.assert_close(avg["0.weight"], (a[0].weight + b[0].weight).detach() / 2)
    assert avg["1.num_batches_tracked"] == 7 and avg["1.num_batches_tracked"].dtype == torch.int64
    a.load_state_dict(avg)  # strict: every key accounted for
    with pytest.raises(ValueError, match="does not match the last one"):
        average_weights([a.state_dict(), torch.nn.Linear(3, 2).state_dict()])
