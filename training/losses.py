"""Training losses for retrieval embeddings: ArcFace, label-smoothed cross-entropy, batch-hard triplet,
the KL divergence between embedding distributions (MABNet master/assistant), and the listwise AP loss
with soft binning (rank distillation).

Losses are plain functions; `ArcFace` is a module only because it owns the class-centre weights (and
optionally a learnable scale/margin). `arcface_logits` takes any weight, e.g. a momentum-updated copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.errors import TrainingError

__all__ = [
    "arcface_logits",
    "ArcFace",
    "BoundedArcFace",
    "label_smoothing_cross_entropy",
    "batch_hard_triplet_loss",
    "embedding_kl",
    "soft_binned_ap",
    "listwise_ap_loss",
]

_COS_CLAMP = 1e-6  # keeps sqrt(1 - cos^2) away from 0, where its gradient is infinite


def _check_labels(labels: Tensor, batch: int, num_classes: int | None = None) -> None:
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise TrainingError(f"labels must have shape ({batch},) to match the batch, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TrainingError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if num_classes is not None and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise TrainingError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, "
                            f"{int(labels.max())}]")


# ------------------------------------------------------------------------------------------ ArcFace


def arcface_logits(embeddings: Tensor, weight: Tensor, labels: Tensor | None, s: float | Tensor = 30.0,
                   m: float | Tensor = 0.5, easy_margin: bool = False) -> Tensor:
    """ArcFace logits (Deng et al. 2019): s * cos(theta_y + m) for the target class, s * cos(theta_j) elsewhere.

    Embeddings (B, D) and class weights (C, D) are L2-normalised here, so any weight matrix works (a
    momentum copy, say). Where theta_y + m would pass pi, cos(theta + m) stops decreasing in theta; as in
    insightface, targets with cos(theta) <= cos(pi - m) get cos(theta) - m * sin(m) instead (or, with
    `easy_margin`, targets with cos(theta) <= 0 keep cos(theta)). labels=None gives s * cos (no margin).
    Computed in float32.
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise TrainingError(f"expected embeddings (B, D) and weight (C, D) with the same D, "
                            f"got {tuple(embeddings.shape)} and {tuple(weight.shape)}")
    cosine = F.linear(F.normalize(embeddings.float(), dim=-1), F.normalize(weight.float(), dim=-1))
    if labels is None:
        return s * cosine
    _check_labels(labels, embeddings.shape[0], weight.shape[0])
    m = torch.as_tensor(m, dtype=cosine.dtype, device=cosine.device)
    target_cos = cosine.gather(1, labels.long()[:, None])  # (B, 1)
    safe_cos = target_cos.clamp(-1.0 + _COS_CLAMP, 1.0 - _COS_CLAMP)
    sine = torch.sqrt(1.0 - safe_cos * safe_cos)
    phi = safe_cos * torch.cos(m) - sine * torch.sin(m)  # cos(theta + m)
    if easy_margin:
        phi = torch.where(target_cos > 0, phi, target_cos)
    else:
        threshold = torch.cos(math.pi - m)
        phi = torch.where(target_cos > threshold, phi, target_cos - m * torch.sin(m))
    one_hot = F.one_hot(labels.long(), num_classes=weight.shape[0]).bool()
    return s * torch.where(one_hot, phi.expand_as(cosine), cosine)


class ArcFace(nn.Module):
    """ArcFace loss with its class centres W (num_classes, embedding_dim), normalised in the forward.

    With `learnable_scale` / `learnable_margin`, s and m are nn.Parameters; m is clamped at 0 in the
    forward. Note the loss alone always prefers a smaller margin, so a learnable m needs a regulariser
    or schedule from the caller to stay away from 0.
    """

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 30.0, m: float = 0.5,
                 learnable_scale: bool = False, learnable_margin: bool = False, easy_margin: bool = False) -> None:
        super().__init__()
        if embedding_dim < 1 or num_classes < 2:
            raise TrainingError(f"need embedding_dim >= 1 and num_classes >= 2, got {embedding_dim} and {num_classes}")
        if s <= 0:
            raise TrainingError(f"ArcFace scale s must be > 0, got {s}")
        if not 0 <= m < math.pi:
            raise TrainingError(f"ArcFace margin m must be in [0, pi) radians, got {m}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.easy_margin = easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self._register_scalar("s", s, learnable_scale)
        self._register_scalar("m", m, learnable_margin)

    def _register_scalar(self, name: str, value: float, learnable: bool) -> None:
        tensor = torch.tensor(float(value))
        if learnable:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor)

    @property
    def margin(self) -> Tensor:
        """The margin in use: m clamped at 0 (a learnable m may step below 0)."""
        return self.m.clamp(min=0.0)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        """(B, num_classes) ArcFace logits; labels=None gives s * cos without margin (inference)."""
        return arcface_logits(embeddings, self.weight, labels, self.s, self.margin, self.easy_margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the ArcFace logits."""
        return F.cross_entropy(self.logits(embeddings, labels), labels.long())

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
                f"s={float(self.s):.3f}, m={float(self.margin):.3f}, easy_margin={self.easy_margin}")


def _logit(fraction: float) -> float:
    return math.log(fraction / (1.0 - fraction))


class BoundedArcFace(ArcFace):
    """ArcFace with learnable s and m held inside `s_bounds` and `m_bounds` (MABNet): each is
    lo + (hi - lo) * sigmoid(raw), so the loss cannot grow s (or shrink m) without limit until it is trivial.
    The raw parameters start where s and m equal their initial values."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 30.0, m: float = 0.3,
                 s_bounds: tuple[float, float] = (8.0, 64.0), m_bounds: tuple[float, float] = (0.05, 0.6)) -> None:
        super().__init__(embedding_dim, num_classes, s, m)
        del self._buffers["s"], self._buffers["m"]  # replaced by the bounded parametrisation below
        for name, value, (lo, hi) in (("s", s, s_bounds), ("m", m, m_bounds)):
            if not 0 <= lo < value < hi:
                raise TrainingError(f"ArcFace {name}={value} must lie strictly inside its bounds ({lo}, {hi})")
        self.s_bounds, self.m_bounds = (float(s_bounds[0]), float(s_bounds[1])), (float(m_bounds[0]), float(m_bounds[1]))
        self.s_raw = nn.Parameter(torch.tensor(_logit((s - s_bounds[0]) / (s_bounds[1] - s_bounds[0]))))
        self.m_raw = nn.Parameter(torch.tensor(_logit((m - m_bounds[0]) / (m_bounds[1] - m_bounds[0]))))

    @property
    def scale(self) -> Tensor:
        lo, hi = self.s_bounds
        return lo + (hi - lo) * torch.sigmoid(self.s_raw)

    @property
    def margin(self) -> Tensor:
        lo, hi = self.m_bounds
        return lo + (hi - lo) * torch.sigmoid(self.m_raw)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        return arcface_logits(embeddings, self.weight, labels, self.scale, self.margin, self.easy_margin)

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, s={float(self.scale):.3f} in "
                f"{self.s_bounds}, m={float(self.margin):.3f} in {self.m_bounds}")


# ------------------------------------------------------------------------------ classification loss


def label_smoothing_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float = 0.1,
                                  temperature: float = 1.0) -> Tensor:
    """Cross-entropy of logits / temperature against labels smoothed toward uniform (CGD's auxiliary loss).

    Target distribution: (1 - smoothing) on the label plus smoothing / C on every class; batch mean.
    A temperature < 1 sharpens the softmax, which CGD uses to enlarge gradients for hard samples.
    """
    if not 0.0 <= smoothing < 1.0:
        raise TrainingError(f"smoothing must be in [0, 1), got {smoothing}")
    if temperature <= 0:
        raise TrainingError(f"temperature must be > 0, got {temperature}")
    if logits.dim() != 2:
        raise TrainingError(f"logits must have shape (B, num_classes), got {tuple(logits.shape)}")
    _check_labels(labels, logits.shape[0], logits.shape[1])
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    nll = -log_probs.gather(1, labels.long()[:, None]).squeeze(1)
    uniform = -log_probs.mean(dim=-1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


# ------------------------------------------------------------------------------------ triplet loss


def batch_hard_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.1,
                            distance: str = "euclidean") -> Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on L2-normalised embeddings.

    Each anchor takes its farthest same-label sample and its nearest other-label sample:
    relu(d(a, p_hardest) - d(a, n_hardest) + margin), averaged over anchors that have both.
    `distance` is "euclidean" (||a - b||) or "cosine" (1 - a.b).
    """
    if embeddings.dim() != 2:
        raise TrainingError(f"embeddings must have shape (B, D), got {tuple(embeddings.shape)}")
    _check_labels(labels, embeddings.shape[0])
    if distance not in ("euclidean", "cosine"):
        raise TrainingError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    x = F.normalize(embeddings.float(), dim=-1)
    cos = x @ x.T
    # euclidean: ||a - b||^2 = 2 - 2 a.b for unit vectors; the floor keeps sqrt's gradient finite at 0
    dist = 1.0 - cos if distance == "cosine" else (2.0 - 2.0 * cos).clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & not_self
    negative = ~same
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not bool(valid.any()):
        raise TrainingError("batch-hard triplet loss found no anchor with both a positive and a negative; "
                            "sample batches with >= 2 images for some class and >= 2 classes (P x K sampling)")
    hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    losses = F.relu(hardest_pos - hardest_neg + margin)
    return losses[valid].mean()


# ---------------------------------------------------------------------------------- distillation


def embedding_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0, detach_teacher: bool = True) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) over the embedding dimension, batch mean.

    MABNet's master/assistant agreement term. No T^2 factor is applied; scale the loss weight instead.
    Unit-norm embeddings give near-uniform softmaxes at T=1, so a small T is usual for them.
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise TrainingError(f"student and teacher must both have shape (B, D), got {tuple(student.shape)} and "
                            f"{tuple(teacher.shape)}")
    if temperature <= 0:
        raise TrainingError(f"temperature must be > 0, got {temperature}")
    if detach_teacher:
        teacher = teacher.detach()
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


# ------------------------------------------------------------------------------------ listwise AP


def soft_binned_ap(scores: Tensor, labels: Tensor, n_bins: int = 20, mask: Tensor | None = None) -> Tensor:
    """Per-query average precision of the ranking by `scores` (Q, N) in [-1, 1], made differentiable by
    triangular soft binning (Revaud et al., ICCV 2019, as used by Laskar & Kannala's rank distillation).

    Bin centres run from 1 down to -1 in `n_bins` steps of width d = 2 / (n_bins - 1); each score adds
    max(0, 1 - |s - c| / d) to the bins beside it. Precision at a bin is (positives so far) / (items so
    far), and AP = sum over bins of precision x (that bin's positives / all positives). `labels` (Q, N)
    marks positives; `mask` (Q, N) says which items take part (e.g. not the query itself). Queries
    without a positive get NaN. As the bins get finer this tends to the exact AP of the hard ranking.
    """
    if scores.dim() != 2 or labels.shape != scores.shape:
        raise TrainingError(f"scores and labels must both be (Q, N), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if mask is not None and mask.shape != scores.shape:
        raise TrainingError(f"mask must be (Q, N) like scores, got {tuple(mask.shape)}")
    if n_bins < 2:
        raise TrainingError(f"n_bins must be >= 2, got {n_bins}")
    scores = scores.float()
    keep = torch.ones_like(scores) if mask is None else mask.to(scores.dtype)
    positive = labels.to(scores.dtype) * keep
    centres = torch.linspace(1.0, -1.0, n_bins, device=scores.device, dtype=scores.dtype)
    width = 2.0 / (n_bins - 1)
    weight = (1.0 - (scores.clamp(-1.0, 1.0)[..., None] - centres).abs() / width).clamp(min=0.0)  # (Q, N, M)
    per_bin_pos = torch.einsum("qnm,qn->qm", weight, positive)
    per_bin_all = torch.einsum("qnm,qn->qm", weight, keep)
    precision = per_bin_pos.cumsum(-1) / per_bin_all.cumsum(-1).clamp(min=1e-12)
    n_pos = positive.sum(-1)
    ap = (precision * per_bin_pos).sum(-1) / n_pos.clamp(min=1.0)
    return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))


def listwise_ap_loss(scores: Tensor, labels: Tensor, n_bins: int = 20, mask: Tensor | None = None) -> Tensor:
    """1 - mean soft-binned AP over the queries that have a positive; 0 (with a zero gradient that still
    reaches `scores`) when none has one, so a batch of lone images does not stop training."""
    ap = soft_binned_ap(scores, labels, n_bins, mask)
    valid = ~torch.isnan(ap)
    if not bool(valid.any()):
        return scores.sum() * 0.0
    return 1.0 - ap[valid].mean()
