"""Fusion variants the AFF paper compares its dynamic mixer with (Tab. "Variants of the mixer"), built on
the mixer's own feature tokens (`FeatureTokens`: per-feature FC + source embedding, local sets as one
token per descriptor) and trained and evaluated exactly like it.

- `LAFFFusion` (Hu et al., "Lightweight Attentional Feature Fusion", ECCV 2022): each token
  h_t = tanh(token_t), a weight a_t = softmax_t(w . h_t) from its own embedding, the weighted sum
  sum_t a_t h_t -> FC -> L2.
- `OrthogonalFusion` (DOLG-style, Yang et al. 2021): the first feature (a global one) is the anchor g; every
  other token loses its projection on g (`training.extractors.dolg.orthogonal_fusion`), the orthogonal parts
  are averaged, concatenated with g and reduced by an FC -> L2.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.aff.mixer import FeatureTokens, MixerArch, MixerInputError
from training.extractors.dolg import orthogonal_fusion


class LAFFFusion(FeatureTokens):
    """Lightweight attentional fusion: a learned weight per token from its own tanh embedding, then a weighted sum."""

    def __init__(self, arch: MixerArch):
        super().__init__(arch)
        nn.init.trunc_normal_(self.source, std=0.02)
        self.attention = nn.Linear(arch.dim, 1)
        self.dropout = nn.Dropout(arch.dropout)
        self.head = nn.Linear(arch.dim, arch.embedding_dim)

    def weights(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, T, d) tanh embeddings and their (B, T) attention weights (0 on padding, rows sum to 1)."""
        tok, pad = self.feature_tokens(inputs)
        h = torch.tanh(tok)
        logits = self.attention(h)[..., 0].masked_fill(pad, float("-inf"))
        return h, torch.softmax(logits, dim=1)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        h, a = self.weights(inputs)
        return F.normalize(self.head(self.dropout((a[..., None] * h).sum(1))), dim=-1)


class OrthogonalFusion(FeatureTokens):
    """DOLG-style: the first (global) feature is the anchor; the other tokens' components orthogonal to it
    are mean-pooled and concatenated with it, then an FC -> L2."""

    def __init__(self, arch: MixerArch):
        super().__init__(arch)
        if arch.inputs[0].local:
            raise MixerInputError(f"orthogonal fusion needs a global feature first (its anchor), got the local set "
                                  f"'{arch.inputs[0].key}'; list a global extractor first")
        if len(arch.inputs) < 2:
            raise MixerInputError("orthogonal fusion needs at least two features (an anchor and one to fuse onto it)")
        nn.init.trunc_normal_(self.source, std=0.02)
        self.dropout = nn.Dropout(arch.dropout)
        self.head = nn.Linear(2 * arch.dim, arch.embedding_dim)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        tok, pad = self.feature_tokens(inputs)
        anchor, rest, keep = tok[:, 0], tok[:, 1:], (~pad[:, 1:]).float()  # the anchor is never dropped
        orth = orthogonal_fusion(rest.transpose(1, 2)[..., None], anchor)[..., 0].transpose(1, 2)
        pooled = (orth * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)
        return F.normalize(self.head(self.dropout(torch.cat([anchor, pooled], dim=1))), dim=-1)
