"""Losses: ArcFace, label-smoothed cross-entropy, batch-hard triplet, embedding KL — against hand
computations and independent reimplementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import training  # noqa: F401  (installs the torchvision shim before anything else)
from training.losses import (
    ArcFace,
    arcface_logits,
    batch_hard_triplet_loss,
    embedding_kl,
    label_smoothing_cross_entropy,
)


def _unit(angle_deg: float, length: float = 1.0) -> list[float]:
    a = math.radians(angle_deg)
    return [length * math.cos(a), length * math.sin(a)]


# ------------------------------------------------------------------------------------------ ArcFace


def test_arcface_with_zero_margin_is_scaled_cosine_softmax():
    torch.manual_seed(0)
    arc = ArcFace(embedding_dim=8, num_classes=5, s=16.0, m=0.0)
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    # independent: cosine via explicit norms, cross-entropy via logsumexp
    cos = (emb / emb.norm(dim=1, keepdim=True)) @ (arc.weight / arc.weight.norm(dim=1, keepdim=True)).T
    logits = 16.0 * cos
    expected = (logits.logsumexp(dim=1) - logits[torch.arange(6), labels]).mean()
    torch.testing.assert_close(arc(emb, labels), expected)


def test_arcface_target_logit_by_hand_in_2d():
    s, m = 10.0, 0.5
    # class 0 at 60 deg, class 1 at 90 deg, class 2 at 170 deg (weights of arbitrary length)
    weight = torch.tensor([_unit(60, 3.0), _unit(90, 0.5), _unit(170, 2.0)])
    emb = torch.tensor([_unit(0, 2.0), _unit(0, 1.0), _unit(0, 1.0)])
    labels = torch.tensor([0, 1, 2])
    got = arcface_logits(emb, weight, labels, s=s, m=m)

    # sample 0, target at theta=60deg: s*cos(pi/3 + m); others unchanged: s*cos(90), s*cos(170)
    assert got[0, 0].item() == pytest.approx(s * math.cos(math.pi / 3 + m), abs=1e-5)
    assert got[0, 1].item() == pytest.approx(0.0, abs=1e-5)
    assert got[0, 2].item() == pytest.approx(s * math.cos(math.radians(170)), abs=1e-5)
    # sample 1, target at theta=90deg: s*cos(pi/2 + m) = -s*sin(m)
    assert got[1, 1].item() == pytest.approx(-s * math.sin(m), abs=1e-5)
    # sample 2, target at theta=170deg > pi - m (151.4deg): cos(theta+m) would increase again, so the
    # fallback s*(cos(theta) - m*sin(m)) applies
    theta = math.radians(170)
    assert theta + m > math.pi
    assert got[2, 2].item() == pytest.approx(s * (math.cos(theta) - m * math.sin(m)), abs=1e-5)
    assert got[2, 2].item() != pytest.approx(s * math.cos(theta + m), abs=1e-2)


def test_arcface_easy_margin_keeps_obtuse_targets():
    weight = torch.tensor([_unit(100), _unit(30)])
    emb = torch.tensor([_unit(0), _unit(0)])
    got = arcface_logits(emb, weight, torch.tensor([0, 1]), s=5.0, m=0.4, easy_margin=True)
    assert got[0, 0].item() == pytest.approx(5.0 * math.cos(math.radians(100)), abs=1e-5)  # cos < 0: no margin
    assert got[1, 1].item() == pytest.approx(5.0 * math.cos(math.radians(30) + 0.4), abs=1e-5)


def test_arcface_logits_are_invariant_to_weight_and_embedding_scale():
    torch.manual_seed(1)
    emb, weight, labels = torch.randn(4, 6), torch.randn(3, 6), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(
        arcface_logits(emb, weight, labels, 30.0, 0.5),
        arcface_logits(3.0 * emb, 0.2 * weight, labels, 30.0, 0.5),
    )


def test_arcface_without_labels_gives_plain_scaled_cosine():
    torch.manual_seed(2)
    emb, weight = torch.randn(3, 4), torch.randn(5, 4)
    want = 7.0 * F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    torch.testing.assert_close(arcface_logits(emb, weight, None, s=7.0, m=0.5), want)


def test_functional_form_matches_module_with_external_weight():
    torch.manual_seed(3)
    arc = ArcFace(6, 4, s=20.0, m=0.3)
    emb, labels = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(arc.logits(emb, labels), arcface_logits(emb, arc.weight, labels, 20.0, 0.3))
    # an externally held (e.g. momentum) copy works and receives no gradient through the module
    momentum_weight = arc.weight.detach().clone() + 0.1
    emb.requires_grad_(True)
    F.cross_entropy(arcface_logits(emb, momentum_weight, labels, 20.0, 0.3), labels).backward()
    assert emb.grad is not None and arc.weight.grad is None


def test_margin_increases_the_loss():
    torch.manual_seed(4)
    emb, labels = torch.randn(8, 6), torch.randint(0, 4, (8,))
    plain = ArcFace(6, 4, s=30.0, m=0.0)
    margin = ArcFace(6, 4, s=30.0, m=0.5)
    margin.weight.data.copy_(plain.weight.data)
    assert margin(emb, labels).item() > plain(emb, labels).item()


def test_learnable_scale_and_margin_receive_gradients():
    torch.manual_seed(5)
    arc = ArcFace(6, 4, s=30.0, m=0.3, learnable_scale=True, learnable_margin=True)
    names = {name for name, _ in arc.named_parameters()}
    assert names == {"weight", "s", "m"}
    arc(torch.randn(8, 6), torch.randint(0, 4, (8,))).backward()
    assert torch.isfinite(arc.s.grad) and arc.s.grad.item() != 0
    # d loss / d m = -s * sin(theta + m) * d loss / d target-logit > 0: a larger margin always costs
    assert arc.m.grad.item() > 0


def test_fixed_scale_and_margin_are_buffers():
    arc = ArcFace(6, 4)
    assert {name for name, _ in arc.named_parameters()} == {"weight"}
    assert {"s", "m"} <= {name for name, _ in arc.named_buffers()}


def test_negative_learnable_margin_is_clamped_to_zero():
    torch.manual_seed(6)
    arc = ArcFace(6, 4, s=10.0, m=0.2, learnable_margin=True)
    with torch.no_grad():
        arc.m.fill_(-0.3)
    emb, labels = torch.randn(3, 6), torch.tensor([0, 1, 2])
    assert arc.margin.item() == 0.0
    torch.testing.assert_close(arc.logits(emb, labels), arcface_logits(emb, arc.weight, labels, 10.0, 0.0))


def test_arcface_gradient_is_finite_when_embedding_equals_class_centre():
    arc = ArcFace(4, 3, s=30.0, m=0.5)
    emb = arc.weight.detach()[:2].clone().requires_grad_(True)  # cos(theta) == 1 exactly for the target
    arc(emb, torch.tensor([0, 1])).backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(arc.weight.grad).all()


def test_arcface_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        arcface_logits(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="same D"):
        arcface_logits(torch.randn(2, 4), torch.randn(3, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"margin m must be in \[0, pi\)"):
        ArcFace(4, 3, m=-0.1)
    with pytest.raises(ValueError, match="scale s must be > 0"):
        ArcFace(4, 3, s=0.0)


# ----------------------------------------------------------------------- label-smoothing cross-entropy


def test_label_smoothing_zero_equals_cross_entropy():
    torch.manual_seed(7)
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    got = label_smoothing_cross_entropy(logits, labels, smoothing=0.0)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels))


def test_label_smoothing_by_hand():
    # logits [1, 2, 3] at T=2 -> z = [0.5, 1, 1.5]; log p_j = z_j - log(sum exp z); label 0, smoothing 0.3:
    # loss = 0.7 * (-log p_0) + 0.3 * mean_j(-log p_j)
    z = [0.5, 1.0, 1.5]
    lse = math.log(sum(math.exp(v) for v in z))
    neg_log_p = [lse - v for v in z]
    expected = 0.7 * neg_log_p[0] + 0.3 * sum(neg_log_p) / 3
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    got = label_smoothing_cross_entropy(logits, torch.tensor([0]), smoothing=0.3, temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_matches_torch_reference():
    torch.manual_seed(8)
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    want = F.cross_entropy(logits / 0.5, labels, label_smoothing=0.2)
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, labels, smoothing=0.2, temperature=0.5), want)


def test_temperature_sharpens_confident_predictions():
    logits, labels = torch.tensor([[4.0, 1.0, 0.0]]), torch.tensor([0])
    losses = [label_smoothing_cross_entropy(logits, labels, 0.0, t).item() for t in (0.5, 1.0, 2.0)]
    assert losses[0] < losses[1] < losses[2]
    # and for a wrong prediction, a low temperature punishes harder
    wrong = [label_smoothing_cross_entropy(logits, torch.tensor([2]), 0.0, t).item() for t in (0.5, 1.0, 2.0)]
    assert wrong[0] > wrong[1] > wrong[2]


def test_label_smoothing_rejects_bad_arguments():
    logits, labels = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\)"):
        label_smoothing_cross_entropy(logits, labels, smoothing=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        label_smoothing_cross_entropy(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        label_smoothing_cross_entropy(logits, torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------- batch-hard triplet

# Five points on the unit circle (given with different lengths: the loss normalises them):
#   x0 at 0deg (label 0), x1 at 60deg (label 0), x2 at 90deg (label 1), x3 at 180deg (label 1), x4 at 270deg (label 2)
# Euclidean (chord) distance for an angle gap D is 2*sin(D/2): 30deg->0.5176, 60->1, 90->sqrt2, 120->sqrt3, 150->1.9319, 180->2
#   a0: pos x1 (60)=1;      negs x2 (90)=sqrt2, x3 (180)=2, x4 (90)=sqrt2       -> hardest neg sqrt2
#   a1: pos x0 (60)=1;      negs x2 (30)=0.5176, x3 (120)=sqrt3, x4 (150)=1.9319 -> hardest neg 0.5176
#   a2: pos x3 (90)=sqrt2;  negs x0 (90)=sqrt2, x1 (30)=0.5176, x4 (180)=2       -> hardest neg 0.5176
#   a3: pos x2 (90)=sqrt2;  negs x0 (180)=2, x1 (120)=sqrt3, x4 (90)=sqrt2       -> hardest neg sqrt2
#   a4: no positive -> ignored
# margin 0.1: a0 relu(1 - 1.4142 + 0.1) = 0; a1 1 - 0.5176 + 0.1 = 0.5824; a2 1.4142 - 0.5176 + 0.1 = 0.9966;
#             a3 relu(1.4142 - 1.4142 + 0.1) = 0.1  -> mean over 4 anchors = 1.6790 / 4 = 0.41975
# Cosine distance 1 - cos(D): 30deg->0.1340, 60->0.5, 90->1, 120->1.5, 150->1.8660, 180->2 (same hardest choices):
#   a0 relu(0.5 - 1 + 0.1) = 0; a1 0.5 - 0.1340 + 0.1 = 0.4660; a2 1 - 0.1340 + 0.1 = 0.9660; a3 1 - 1 + 0.1 = 0.1
#   -> mean 1.5320 / 4 = 0.3830
TRIPLET_EMB = torch.tensor([_unit(0, 2.0), _unit(60, 0.5), _unit(90, 1.0), _unit(180, 3.0), _unit(270, 1.5)])
TRIPLET_LABELS = torch.tensor([0, 0, 1, 1, 2])


def test_batch_hard_triplet_euclidean_by_hand():
    chord = lambda deg: 2 * math.sin(math.radians(deg) / 2)  # noqa: E731
    per_anchor = [
        max(0.0, chord(60) - chord(90) + 0.1),
        max(0.0, chord(60) - chord(30) + 0.1),
        max(0.0, chord(90) - chord(30) + 0.1),
        max(0.0, chord(90) - chord(90) + 0.1),
    ]
    expected = sum(per_anchor) / 4
    assert expected == pytest.approx(0.41975, abs=1e-4)  # the figure worked out in the comment above
    got = batch_hard_triplet_loss(TRIPLET_EMB, TRIPLET_LABELS, margin=0.1)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_batch_hard_triplet_cosine_by_hand():
    cdist = lambda deg: 1 - math.cos(math.radians(deg))  # noqa: E731
    expected = (0.0 + (cdist(60) - cdist(30) + 0.1) + (cdist(90) - cdist(30) + 0.1) + 0.1) / 4
    assert expected == pytest.approx(0.3830, abs=1e-4)
    got = batch_hard_triplet_loss(TRIPLET_EMB, TRIPLET_LABELS, margin=0.1, distance="cosine")
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_batch_hard_triplet_picks_farthest_positive_and_nearest_negative():
    # x0 0deg, x1 20deg, x2 80deg (label 0); x3 100deg, x4 200deg (label 1); margin 0.3; chord 2*sin(D/2)
    #   a0: pos gaps 20, 80 -> 80 (1.2856); neg gaps 100, 160 -> 100 (1.5321): 1.2856 - 1.5321 + 0.3 = 0.0535
    #   a1: pos gaps 20, 60 -> 60 (1.0);    neg gaps 80, 180  -> 80 (1.2856):  1.0 - 1.2856 + 0.3    = 0.0144
    #   a2: pos gaps 80, 60 -> 80 (1.2856); neg gaps 20, 120  -> 20 (0.3473):  1.2856 - 0.3473 + 0.3 = 1.2383
    #   a3: pos gap 100 (1.5321);           neg gaps 100, 80, 20 -> 20 (0.3473): 1.5321 - 0.3473 + 0.3 = 1.4848
    #   a4: pos gap 100 (1.5321);           neg gaps 160, 180, 120 -> 120 (1.7321): 1.5321 - 1.7321 + 0.3 = 0.1
    #   mean = 2.8910 / 5 = 0.5782
    chord = lambda deg: 2 * math.sin(math.radians(deg) / 2)  # noqa: E731
    expected = (
        (chord(80) - chord(100) + 0.3)
        + (chord(60) - chord(80) + 0.3)
        + (chord(80) - chord(20) + 0.3)
        + (chord(100) - chord(20) + 0.3)
        + (chord(100) - chord(120) + 0.3)
    ) / 5
    assert expected == pytest.approx(0.5782, abs=1e-4)
    emb = torch.tensor([_unit(0), _unit(20), _unit(80), _unit(100), _unit(200)])
    got = batch_hard_triplet_loss(emb, torch.tensor([0, 0, 0, 1, 1]), margin=0.3)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_batch_hard_triplet_is_zero_for_well_separated_classes_and_has_finite_gradients():
    emb = torch.tensor([_unit(0), _unit(0), _unit(180), _unit(180)], requires_grad=True)  # duplicates: d=0
    loss = batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), margin=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_batch_hard_triplet_requires_a_valid_anchor():
    with pytest.raises(ValueError, match="no anchor with both a positive and a negative"):
        batch_hard_triplet_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="no anchor with both a positive and a negative"):
        batch_hard_triplet_loss(torch.randn(3, 4), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="distance must be"):
        batch_hard_triplet_loss(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]), distance="l1")


# ------------------------------------------------------------------------------------- embedding KL


def test_embedding_kl_is_zero_for_identical_and_positive_otherwise():
    torch.manual_seed(9)
    x = torch.randn(4, 16)
    assert embedding_kl(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_kl(x, torch.randn(4, 16)).item() > 0


def test_embedding_kl_by_hand_two_elements():
    # row 0: student [0, 0] -> p_s = [1/2, 1/2]; teacher [ln 3, 0] -> p_t = [3/4, 1/4]
    #   KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.13081
    # row 1: identical -> 0.   batch mean = 0.13081 / 2
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, -1.0]])
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    assert embedding_kl(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    # direction matters: KL(p_s || p_t) = 1/2 ln(2/3) + 1/2 ln 2 = 0.14384 differs
    reverse = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) / 2
    assert embedding_kl(teacher, student).item() == pytest.approx(reverse, rel=1e-5)
    # T = 2 on the teacher row: softmax([ln3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1)
    pt = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    expected_t2 = sum(p * math.log(p / 0.5) for p in pt) / 2
    assert embedding_kl(student, teacher, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-5)


def test_embedding_kl_detaches_teacher_by_default():
    student = torch.randn(3, 8, requires_grad=True)
    teacher = torch.randn(3, 8, requires_grad=True)
    embedding_kl(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None
    student.grad = None
    embedding_kl(student, teacher, detach_teacher=False).backward()
    assert student.grad is not None and teacher.grad is not None and teacher.grad.abs().sum() > 0


def test_embedding_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"both have shape \(B, D\)"):
        embedding_kl(torch.randn(2, 4), torch.randn(2, 5))
