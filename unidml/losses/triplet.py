"""Triplet margin loss over mined (anchor, positive, negative) triplets."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from unidml.config import METRICS
from unidml.kernels.pairwise.rows import TripletRows
from unidml.losses.base import Pairs, PairwiseLoss, Triplets, as_triplets, choice
from unidml.losses.registry import register_loss

MININGS = ("all", "semi_hard", "batch_hard")


@register_loss("triplet")
class TripletLoss(PairwiseLoss):
    """Triplet margin loss: relu(D_ap - D_an + margin) over triplets, mean over the non-zero ones.

    Same value and gradient as pytorch-metric-learning's `TripletMarginLoss` with the same settings
    (and, for `semi_hard` / `batch_hard`, its TripletMarginMiner / BatchHardMiner); a miner's triplets
    (or pairs, combined per anchor as PML does) can be passed as `indices_tuple`, and are then used as
    they are (no further mining).

    Parameters:
        margin: how much closer than the negative the positive must be (on D).
        mining: `all` (every positive/negative pair of an anchor), `semi_hard` (0 < D_an - D_ap < margin)
            or `batch_hard` (hardest positive and hardest negative per anchor).
        distance: `euclidean` (D = distance) or `cosine` (D = -similarity, as PML's CosineSimilarity).
        normalize: L2-normalise the embeddings first (always on for cosine).
        backend, device, cross_rank, chunk_rows: see `PairwiseLoss`.
    """

    def __init__(self, margin: float = 0.05, mining: str = "all", distance: str = "euclidean",
                 normalize: bool = True, backend: str = "auto", device: torch.device | str | None = None,
                 cross_rank: bool = False, chunk_rows: int | None = None) -> None:
        spec = TripletRows(float(margin), choice(mining, MININGS, "mining"), choice(distance, METRICS, "distance"))
        super().__init__(spec, normalize=normalize, backend=backend, device=device, cross_rank=cross_rank,
                         chunk_rows=chunk_rows)

    def mined_rows(self, v: Tensor, indices: Pairs | Triplets) -> tuple[Tensor, Tensor]:
        """Each mined triplet as it occurs: one row per triplet, its positive and its negative as columns."""
        a, p, n = as_triplets(indices)
        values = torch.stack([v[a, p], v[a, n]], dim=1)
        is_pos = torch.tensor([[True, False]], device=v.device).expand(values.shape[0], 2)
        return dataclasses.replace(self.spec, mining="all").rows(values, is_pos, ~is_pos, torch.ones_like(is_pos))
