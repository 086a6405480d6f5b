"""Supervised contrastive loss (Khosla et al., 2020) on cosine similarity."""
from __future__ import annotations

import torch

from unidml.kernels.pairwise.rows import SoftNeighbourRows
from unidml.losses.base import PairwiseLoss, positive
from unidml.losses.registry import register_loss


@register_loss("supcon")
class SupConLoss(PairwiseLoss):
    """-(1/n) Σ_i [mean_{j≠i, y_j=y_i} S_ij/σ - log Σ_{k≠i} e^{S_ik/σ}]: SNCA's per-positive average.

    Anchors without a positive contribute 0 and are not counted.
    """

    def __init__(self, temperature: float = 0.1, backend: str = "auto", device: torch.device | str | None = None,
                 cross_rank: bool = False, chunk_rows: int | None = None) -> None:
        spec = SoftNeighbourRows(positive(temperature, "temperature"), per_positive=True)
        super().__init__(spec, normalize=True, backend=backend, device=device, cross_rank=cross_rank,
                         chunk_rows=chunk_rows)
