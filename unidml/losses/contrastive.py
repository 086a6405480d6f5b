"""Contrastive loss: pull positives within a margin, push negatives beyond another."""
from __future__ import annotations

import torch
from torch import Tensor

from unidml.config import METRICS
from unidml.kernels.pairwise.rows import ContrastiveRows
from unidml.losses.base import Pairs, PairwiseLoss, Triplets, as_pairs, choice
from unidml.losses.registry import register_loss

REDUCTIONS = ("mean_nonzero", "mean", "per_anchor")


@register_loss("contrastive")
class ContrastiveLoss(PairwiseLoss):
    """Contrastive loss: Σ_pos (D - m_pos)_+^p + Σ_neg (m_neg - D)_+^p, each part reduced separately.

    Same value and gradient as pytorch-metric-learning's `ContrastiveLoss` with the same settings; as
    there, a miner's pairs (or triplets) can be passed as `indices_tuple`.

    Parameters:
        pos_margin: positives are pulled until their distance is below it (D ≤ m_pos costs nothing).
        neg_margin: negatives are pushed until their distance is above it.
        power: 1 or 2, the exponent p of each hinge.
        distance: `euclidean` (D = distance) or `cosine` (D = similarity; the margins then flip, like PML:
            positives should be above pos_margin, negatives below neg_margin).
        normalize: L2-normalise the embeddings first (always on for cosine).
        reduction: `mean_nonzero` (PML's AvgNonZeroReducer: each part over its non-zero pairs), `mean`
            (each part over all its pairs) or `per_anchor` ((1/n) Σ_i Σ_j, docs/design.md "Losses").
        backend, device, cross_rank, chunk_rows: see `PairwiseLoss`.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, power: int = 1,
                 distance: str = "euclidean", normalize: bool = True, reduction: str = "mean_nonzero",
                 backend: str = "auto", device: torch.device | str | None = None, cross_rank: bool = False,
                 chunk_rows: int | None = None) -> None:
        if power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {power}")
        spec = ContrastiveRows(float(pos_margin), float(neg_margin), int(power),
                               choice(reduction, REDUCTIONS, "reduction"), choice(distance, METRICS, "distance"))
        super().__init__(spec, normalize=normalize, backend=backend, device=device, cross_rank=cross_rank,
                         chunk_rows=chunk_rows)

    def mined_rows(self, v: Tensor, indices: Pairs | Triplets) -> tuple[Tensor, Tensor]:
        """Each mined pair as it occurs (PML's pair-based reduction): the pairs as rows of one column."""
        if self.spec.reduction == "per_anchor":
            raise ValueError("reduction 'per_anchor' does not take indices_tuple (use mean_nonzero or mean)")
        a1, p, a2, n = as_pairs(indices)
        column = torch.cat([v[a1, p], v[a2, n]])[:, None]
        is_pos = torch.arange(column.shape[0], device=v.device)[:, None] < a1.shape[0]
        return self.spec.rows(column, is_pos, ~is_pos, torch.ones_like(is_pos))
