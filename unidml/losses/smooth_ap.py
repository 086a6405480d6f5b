"""Smooth-AP (Brown et al., ECCV 2020): one minus the average precision computed from sigmoid-smoothed ranks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unidml.losses.base import RankLoss, positive
from unidml.losses.registry import register_loss


@dataclass(frozen=True)
class SmoothAPRanks:
    """Rank program of Smooth-AP: AP_q = (1/|P_q|) Σ_{i∈P_q} R_P(q, i) / R_Ω(q, i) (`kernels.ranks`)."""

    temperature: float
    exclude_self: bool = False  # the authors' code ranks the query among its own retrieval set
    positive_ranks: bool = True

    def per_anchor(self, rank_all: Tensor, rank_pos: Tensor | None, pos: Tensor) -> tuple[Tensor, Tensor]:
        pos = pos.to(rank_all.dtype)
        count = pos.sum(1)
        ap = (pos * rank_pos / rank_all).sum(1) / count.clamp(min=1)
        counted = count > 0
        return torch.where(counted, 1 - ap, torch.zeros_like(ap)), counted


@register_loss("smooth_ap")
class SmoothAPLoss(RankLoss):
    """Smooth-AP: the mean over anchors q of 1 − AP_q, on cosine similarity S of L2-normalised embeddings:

    AP_q = (1/|P_q|) Σ_{i∈P_q} (1 + Σ_{k∈P_q, k≠i} σ((S_qk − S_qi)/τ)) / (1 + Σ_{k≠i} σ((S_qk − S_qi)/τ)),

    where k runs over the references (the batch, the anchor itself included, as in the authors' code)
    and P_q are the references sharing q's label (q itself included). Anchors without a positive
    reference (only possible with `ref_emb`) are not counted. Any class sizes and batch order work.

    pytorch-metric-learning's `SmoothAPLoss` computes this exact value and gradient only on batches of
    contiguous, equal-size classes with as many classes as images per class (it splits the batch into
    blocks of batch / images-per-class rows); it also takes no `ref_emb` and we take no `indices_tuple`.

    Parameters:
        temperature: τ of the rank sigmoid (the paper's 0.01).
        backend, device, chunk_rows: see `RankLoss`.
    """

    def __init__(self, temperature: float = 0.01, backend: str = "auto", device: torch.device | str | None = None,
                 chunk_rows: int | None = None) -> None:
        super().__init__(SmoothAPRanks(positive(temperature, "temperature")), backend=backend, device=device,
                         chunk_rows=chunk_rows)
