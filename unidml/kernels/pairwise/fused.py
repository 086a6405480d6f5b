"""The contract between row programs and the fused Triton kernels: loss ids, reduction ids, parameters.

A row program with a fused kernel describes itself as `KernelArgs`; the kernels branch on the same
ids (imported as `tl.constexpr` in `triton_kernels`), so no id is written twice.

Parameters P0..P3 per loss (u = sign·V is the dissimilarity, `geometry.PairMetric`):
contrastive (pos margin on u, neg margin on u, sign, -), multi-similarity (α, β, base, ε),
SNCA / SupCon (temperature, -, -, -), batch-hard triplet (margin, -, sign, -), triplet over all or
semi-hard triplets (margin, 1 if semi-hard else 0, sign, -; kernels in `triton_triplet`).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class LossId(IntEnum):
    CONTRASTIVE = 0
    MULTI_SIMILARITY = 1
    SNCA = 2
    SUPCON = 3
    BATCH_HARD_TRIPLET = 4
    TRIPLET = 5


class ReductionId(IntEnum):
    MEAN_NONZERO = 0  # each part over its active pairs
    MEAN = 1  # each part over all its pairs
    PER_ANCHOR = 2  # (1/n) Σ_i Σ_j


REDUCTION_IDS = {"mean_nonzero": ReductionId.MEAN_NONZERO, "mean": ReductionId.MEAN,
                 "per_anchor": ReductionId.PER_ANCHOR}


@dataclass(frozen=True)
class KernelArgs:
    """What the fused kernels read for one row program."""

    loss: LossId
    params: tuple[float, float, float, float]
    power: int = 1
    reduction: ReductionId = ReductionId.MEAN_NONZERO
