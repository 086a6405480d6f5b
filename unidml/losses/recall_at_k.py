"""Recall@k surrogate (Patel, Tolias, Matas, CVPR 2022): one minus a sigmoid-smoothed recall at several k."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from unidml.losses.base import RankLoss, positive
from unidml.losses.registry import register_loss


@dataclass(frozen=True)
class RecallAtKRanks:
    """Rank program of the Recall@k surrogate: r_k(q) = Σ_{i∈P_q} σ((k − R_Ω(q, i))/τ_k) / min(k, |P_q|)."""

    temperature: float
    k_temperature: float
    ks: tuple[int, ...]
    exclude_self: bool = True  # the query is not in its own retrieval set
    positive_ranks: bool = False

    def per_anchor(self, rank_all: Tensor, rank_pos: Tensor | None, pos: Tensor) -> tuple[Tensor, Tensor]:
        pos = pos.to(rank_all.dtype)
        count = pos.sum(1)
        recall = torch.zeros_like(count)
        for k in self.ks:
            hits = (torch.sigmoid((k - rank_all) / self.k_temperature) * pos).sum(1)
            recall = recall + hits / count.clamp(min=1, max=k)
        counted = count > 0
        return torch.where(counted, 1 - recall / len(self.ks), torch.zeros_like(recall)), counted


@register_loss("recall_at_k")
class RecallAtKLoss(RankLoss):
    """Recall@k surrogate: the mean over anchors q of 1 − (1/|K|) Σ_{k∈K} r_k(q), on cosine similarity S of
    L2-normalised embeddings, with the smoothed rank of reference i in the retrieval set Ω_q of anchor q
    (the references without the anchor itself) and its positives P_q ⊆ Ω_q (same label):

    R(q, i) = 1 + Σ_{j∈Ω_q, j≠i} σ((S_qj − S_qi)/τ),   r_k(q) = Σ_{i∈P_q} σ((k − R(q, i))/τ_k) / min(k, |P_q|).

    Anchors without a positive are not counted. The paper's formula without its similarity mixup; the
    authors' code also counts the query in every rank (each rank one higher) and clips Σ_i σ at k, which
    this loss does not.

    Parameters:
        temperature: τ of the rank sigmoid on similarity differences (the paper's 0.01).
        k_temperature: τ_k of the sigmoid on k − R (the paper's 1; the authors' code defaults to τ_k = k).
        ks: the k averaged over (the paper's 1, 2, 4, 8, 16).
        backend, device, chunk_rows: see `RankLoss`.
    """

    def __init__(self, temperature: float = 0.01, k_temperature: float = 1.0, ks: Sequence[int] = (1, 2, 4, 8, 16),
                 backend: str = "auto", device: torch.device | str | None = None,
                 chunk_rows: int | None = None) -> None:
        ks = tuple(ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {list(ks)}")
        program = RecallAtKRanks(positive(temperature, "temperature"), positive(k_temperature, "k_temperature"), ks)
        super().__init__(program, backend=backend, device=device, chunk_rows=chunk_rows)
