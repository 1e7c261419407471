"""Data-efficient rank distillation (Laskar & Kannala, ACCV 2020): the loss of one batch.

A black-box teacher's embeddings T (B, Dt) of a batch and the student's S (B, Ds) are both L2-normalised;
the dims may differ. R times per batch, one lambda ~ Beta(alpha, alpha) mixes every sample with a random
partner in *representation* space (teacher and student alike, then re-normalised), which adds B virtual
samples without a single extra teacher call. Labels come from the teacher: similarity labelling marks z a
positive of q when cos_T(q, z) > tau; mixup labelling adds, for a mixed sample of k and r, the positives
of k and of r (P_kr u P_k u P_r), and the label matrix is kept symmetric. The student is trained to rank
the joint set (originals + mixed) as those labels say, with the listwise AP loss (soft binning over the
cosine range [-1, 1]); queries without a positive are masked, and the loss is averaged over the R mixings.

Choices the paper leaves open, made here and documented in docs/distill.md:
- alpha = 1.0 (lambda uniform in [0, 1]): mixed samples anywhere between the two, not near an original;
- 20 bins (the AP loss of Revaud et al. uses 10-25; the test shows the error against exact AP shrinking);
- a mixed sample is a positive of its two constituents (they are in P_k and P_r: cos_T(k, k) = 1 > tau);
- mixed student rows are built from detached student embeddings (no gradient flows through them), as the
  issue's reading of the paper says; `detach_mixed=False` is the ablation.
Asymmetric mode (beyond the paper, for a phone model that queries the teacher's own gallery): with equal
dims the student's embeddings are also ranked against the teacher's (cross-model AP, same labels) and can
be pulled onto them (1 - cos); the student then lives in the teacher's embedding space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.config import Checked, ConfigError
from training.errors import TrainingError
from training.losses import listwise_ap_loss


@dataclass(frozen=True)
class RankDistillConfig(Checked):
    """The loss's knobs; the defaults are the paper's where it gives them (tau, R)."""

    tau: float = 0.75  # similarity-labelling threshold on the teacher's cosine
    mix_iterations: int = 10  # R
    alpha: float = 1.0  # lambda ~ Beta(alpha, alpha), one per batch and mixing
    n_bins: int = 20  # soft bins of the AP loss over [-1, 1]
    mixup_labelling: bool = True  # False: similarity labels only (ablation)
    detach_mixed: bool = True  # False: gradients through the mixed student rows (ablation)
    symmetric_weight: float = 1.0  # student vs student ranking (the paper's loss)
    cross_weight: float = 0.0  # asymmetric mode: student queries ranked against teacher embeddings
    pull_weight: float = 0.0  # asymmetric mode: 1 - cos(student, teacher) per image
    _where = "loss"
    _checks = {"tau": "(-1, 1)", "mix_iterations symmetric_weight cross_weight pull_weight": ">= 0", "alpha": "> 0"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.symmetric_weight + self.cross_weight + self.pull_weight == 0:
            raise ConfigError("at least one of loss.symmetric_weight, cross_weight, pull_weight must be > 0")

    @property
    def asymmetric(self) -> bool:
        return self.cross_weight > 0 or self.pull_weight > 0


def mix(x: Tensor, partner: Tensor, lam: float | Tensor) -> Tensor:
    """lambda * x + (1 - lambda) * x[partner], re-normalised to unit length."""
    return F.normalize(lam * x + (1.0 - lam) * x[partner], dim=-1)


def similarity_labels(teacher: Tensor, tau: float) -> Tensor:
    """(N, N) bool: z is a positive of q when the teacher's cosine exceeds tau (similarity labelling)."""
    return (teacher @ teacher.T) > tau


def mixup_labels(labels: Tensor, partner: Tensor) -> Tensor:
    """Mixup labelling on the joint set [originals (B); mixed (B)], given its similarity labels (2B, 2B):
    mixed sample k~ (of k and r = partner[k]) gets P_k~r u P_k u P_r; the result is made symmetric."""
    b = partner.numel()
    if labels.shape != (2 * b, 2 * b):
        raise TrainingError(f"labels must be (2B, 2B) = ({2 * b}, {2 * b}) for B = {b} partners, "
                         f"got {tuple(labels.shape)}")
    k = torch.arange(b, device=labels.device)
    out = labels.clone()
    out[b:] = labels[b:] | labels[k] | labels[partner]
    return out | out.T


def _joint(x: Tensor, partner: Tensor, lam: float, detach: bool) -> Tensor:
    mixed = mix(x.detach() if detach else x, partner, lam)
    return torch.cat([x, mixed])


def distill_loss(student: Tensor, teacher: Tensor, cfg: RankDistillConfig,
                 rng: np.random.Generator) -> tuple[Tensor, dict[str, float]]:
    """The batch loss (averaged over cfg.mix_iterations mixings; with 0, the originals alone) and a few
    figures to log. `student` (B, Ds) carries the gradient; `teacher` (B, Dt) is a constant; `rng` draws
    each mixing's lambda and partners (seeded by the caller, so a resumed run repeats them)."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise TrainingError(f"student (B, Ds) and teacher (B, Dt) must embed the same batch, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if cfg.asymmetric and student.shape[1] != teacher.shape[1]:
        raise TrainingError(f"asymmetric mode ranks the student against the teacher's embeddings, so their dims "
                         f"must match: student {student.shape[1]}, teacher {teacher.shape[1]}")
    if student.shape[0] < 2:
        raise TrainingError("a rank-distillation batch needs at least 2 images")
    student = F.normalize(student.float(), dim=-1)
    teacher = F.normalize(teacher.detach().float(), dim=-1)
    b = student.shape[0]
    device = student.device
    rounds = max(1, cfg.mix_iterations)
    total = student.new_zeros(())
    positives = 0.0
    for _ in range(rounds):
        if cfg.mix_iterations == 0:
            s_joint, t_joint = student, teacher
            labels = similarity_labels(teacher, cfg.tau)
        else:
            lam = float(rng.beta(cfg.alpha, cfg.alpha))
            partner = torch.from_numpy(rng.permutation(b)).to(device)
            t_joint = _joint(teacher, partner, lam, detach=True)
            s_joint = _joint(student, partner, lam, detach=cfg.detach_mixed)
            labels = similarity_labels(t_joint, cfg.tau)
            if cfg.mixup_labelling:
                labels = mixup_labels(labels, partner)
        n = s_joint.shape[0]
        not_self = ~torch.eye(n, dtype=torch.bool, device=device)
        loss = s_joint.new_zeros(())
        if cfg.symmetric_weight:
            loss = loss + cfg.symmetric_weight * listwise_ap_loss(s_joint @ s_joint.T, labels, cfg.n_bins, not_self)
        if cfg.cross_weight:
            # the student's query against the teacher's gallery, its own teacher embedding included
            loss = loss + cfg.cross_weight * listwise_ap_loss(s_joint @ t_joint.T, labels | ~not_self, cfg.n_bins)
        if cfg.pull_weight:
            loss = loss + cfg.pull_weight * (1.0 - (student * teacher).sum(-1)).mean()
        total = total + loss
        positives += float((labels & not_self).sum()) / n
    return total / rounds, {"loss": float(total.detach()) / rounds, "positives_per_query": positives / rounds}


def average_weights(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The mean of several state dicts of one model (the paper averages the weights of its 20th and 30th
    epochs); integer buffers such as BatchNorm's num_batches_tracked come from the last state."""
    if not states:
        raise TrainingError("average_weights needs at least one state dict")
    keys = list(states[-1])
    for i, state in enumerate(states):
        if set(state) != set(keys):
            extra, missing = sorted(set(state) - set(keys)), sorted(set(keys) - set(state))
            raise TrainingError(f"state {i} does not match the last one (extra {extra[:3]}, missing {missing[:3]}): "
                             "average checkpoints of the same model only")
    out = {}
    for key in keys:
        values = [state[key] for state in states]
        out[key] = (torch.stack([v.float() for v in values]).mean(0).to(values[-1].dtype)
                    if values[-1].is_floating_point() else values[-1].clone())
    return out
