"""Multi-similarity loss with its pair miner (Wang et al., 2019), on cosine similarity."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from unidml.kernels.pairwise.rows import MultiSimilarityRows
from unidml.losses.base import Pairs, PairwiseLoss, Triplets, masked_rows
from unidml.losses.registry import register_loss


@register_loss("multi_similarity")
class MultiSimilarityLoss(PairwiseLoss):
    """Multi-similarity loss with its miner, on cosine similarity S:

    (1/n) Σ_i [(1/α) log(1 + Σ_{kept P_i} e^{-α(S_ij-λ)}) + (1/β) log(1 + Σ_{kept N_i} e^{β(S_ij-λ)})].

    A positive is kept if S_ij - ε < max over the anchor's negatives, a negative if S_ij + ε > min over
    its positives: the same value and gradient as pytorch-metric-learning's MultiSimilarityLoss with a
    MultiSimilarityMiner(ε). Given another miner's pairs as `indices_tuple`, exactly those pairs are
    used (no ε mining), as PML's MultiSimilarityLoss does with that miner.

    Parameters:
        alpha: weight α of the positive pairs' term.
        beta: weight β of the negative pairs' term.
        base: the similarity λ around which pairs are pulled and pushed.
        epsilon: the miner's margin ε.
        backend, device, cross_rank, chunk_rows: see `PairwiseLoss`.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1,
                 backend: str = "auto", device: torch.device | str | None = None, cross_rank: bool = False,
                 chunk_rows: int | None = None) -> None:
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
        spec = MultiSimilarityRows(float(alpha), float(beta), float(base), float(epsilon))
        super().__init__(spec, normalize=True, backend=backend, device=device, cross_rank=cross_rank,
                         chunk_rows=chunk_rows)

    def mined_rows(self, v: Tensor, indices: Pairs | Triplets) -> tuple[Tensor, Tensor]:
        """The mined pairs as the anchors' masks, without the ε miner (the given miner chose them)."""
        return masked_rows(dataclasses.replace(self.spec, mine=False), v, indices)
