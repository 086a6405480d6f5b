"""Pair values, pair masks and the duplicate rule shared by every pairwise backend.

A pairwise loss sees, for anchors x (n, d) and references r (m, d), the matrix V of cosine
similarities (`cosine`, inputs already L2-normalised) or Euclidean distances (`euclidean`), plus the
positive / negative masks from the labels. Self-pairs are removed by global index: anchor i is
reference column `self_offset + i` (None when anchors and references are different sets).

Duplicate rule (docs/design.md, "Duplicates and ties"). Every backend computes V from fp32 dot
products whose rounding depends on summation order (a GEMM's blocking, a tile, the CPU's vector
width), so an exact duplicate's squared distance comes out as 0 or as a tiny number of either sign,
and "is this hinge term non-zero" would depend on the hardware. With
c = `duplicate_tolerance(d)`, each backend therefore snaps, from its own computed values:

- Euclidean: d2_ij = |x_i|² + |r_j|² - 2 x_i·r_j ≤ c·(|x_i|² + |r_j|²)  →  D_ij = 0, with zero gradient
  (like torch.cdist at 0); otherwise D_ij = sqrt(d2_ij).
- cosine (unit inputs, so d2 = 2 - 2S and the same rule reads):  1 - S_ij ≤ c  →  S_ij = 1, keeping
  the gradient of S (it is well defined there, unlike that of D).

Every hinge and mining decision is then taken on the snapped values, strictly (a term is active iff
it is > 0), so a pair involving a duplicate has an exact value (D = 0, S = 1) and the same status in
every backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Unit roundoff of fp32, the accumulation type of every backend (half inputs are multiplied exactly
# in fp32 by the fused kernel; the other backends upcast first).
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def duplicate_tolerance(d: int) -> float:
    """c(d) = 4·(γ_d + 2u), u = 2⁻²⁴, γ_d = d·u / (1 - d·u): the duplicate rule's coefficient.

    Why: a length-d dot product, summed in any order (blocked, pairwise, with FMA), is off by at most
    γ_d·|x||r| (Higham, Accuracy and Stability of Numerical Algorithms, §3.1), and so are |x|² and
    |r|²; the two additions forming d2 add at most 2u·2(|x|² + |r|²) since every partial sum is
    bounded by (|x| + |r|)² ≤ 2(|x|² + |r|²). Hence |computed d2 - d2| ≤ (2γ_d + 4u)(|x|² + |r|²),
    and c is twice that coefficient, which also covers accumulators that truncate instead of
    rounding (error up to 2u per operation). For unit vectors at d = 512 it merges pairs closer than
    D ≈ 0.016 (S > 0.99988); at d = 128, D ≈ 0.008.
    """
    if d < 1:
        raise ValueError(f"embedding width must be >= 1, got {d}")
    du = d * FP32_UNIT_ROUNDOFF
    if du >= 0.5:
        raise ValueError(f"embedding width {d} is too large for fp32 accumulation")
    return 4.0 * (du / (1.0 - du) + 2.0 * FP32_UNIT_ROUNDOFF)


def safe_sqrt(x: Tensor, keep: Tensor) -> Tensor:
    """sqrt(x) where `keep`, else 0 with zero gradient (not inf/NaN)."""
    return torch.where(keep, torch.sqrt(torch.where(keep, x, torch.ones_like(x))), torch.zeros_like(x))


@dataclass(frozen=True)
class PairMetric:
    """Orientation and computation of one pair value (pytorch-metric-learning's BaseDistance).

    `is_inverted`: larger V means closer (a similarity). Margin losses read every metric through the
    dissimilarity u = sign·V, and a margin m given on V is the margin `margin(m)` = sign·m on u.
    The inverted metric is the cosine similarity of unit vectors, V = x·r; the other is the
    Euclidean distance, V = sqrt(|x|² + |r|² - 2x·r).
    """

    name: str
    is_inverted: bool

    @property
    def sign(self) -> float:
        return -1.0 if self.is_inverted else 1.0

    def dissimilarity(self, v: Tensor) -> Tensor:
        """u = sign·V: grows as the pair moves apart, for either orientation."""
        return -v if self.is_inverted else v

    def margin(self, m: float) -> float:
        """A margin on V expressed on u (PML's `distance.margin` convention for inverted metrics)."""
        return self.sign * m

    def beyond(self, v: Tensor, m: float) -> Tensor:
        """u - margin(m), one operation into a new tensor: how far each pair is past the margin m."""
        return torch.rsub(v, m) if self.is_inverted else v - m

    def within(self, v: Tensor, m: float) -> Tensor:
        """margin(m) - u, one operation into a new tensor: how far each pair is inside the margin m."""
        return v - m if self.is_inverted else torch.rsub(v, m)

    def values(self, dots: Tensor, x_sq: Tensor, r_sq: Tensor, tol: float) -> Tensor:
        """V from dot products and squared norms (broadcast to `dots`), with the duplicate rule.

        Differentiable; the cosine similarity ignores the norms.
        """
        if self.is_inverted:
            snap = dots >= 1.0 - tol
            return torch.where(snap, dots + (1.0 - dots).detach(), dots)  # exactly 1, gradient of S
        norms = x_sq + r_sq
        d2 = norms - 2.0 * dots
        return safe_sqrt(d2, d2 > tol * norms)

    def block_values(self, x: Tensor, r: Tensor, x_sq: Tensor, r_sq: Tensor, tol: float) -> Tensor:
        """The same values for a block x (c, d) against r (m, d) with the fewest passes, no autograd."""
        if self.is_inverted:
            v = x @ r.T
            return v.masked_fill_(v >= 1.0 - tol, 1.0)
        bound = torch.add(x_sq[:, None], r_sq[None, :]).mul_(tol)
        d2 = torch.addmm(r_sq[None, :], x, r.T, alpha=-2.0).add_(x_sq[:, None])
        return d2.masked_fill_(d2 <= bound, 0.0).sqrt_()


COSINE = PairMetric("cosine", is_inverted=True)
EUCLIDEAN = PairMetric("euclidean", is_inverted=False)
PAIR_METRICS = {m.name: m for m in (COSINE, EUCLIDEAN)}  # the names of unidml.config.METRICS


def pair_metric(name: str) -> PairMetric:
    """The metric called `name` (ValueError naming the known ones otherwise)."""
    if name not in PAIR_METRICS:
        raise ValueError(f"unknown metric '{name}' (known: {', '.join(PAIR_METRICS)})")
    return PAIR_METRICS[name]


def squared_norms(x: Tensor) -> Tensor:
    """|x_i|² per row, in fp32."""
    x = x.float()
    return (x * x).sum(1)


def pair_masks(y: Tensor, ref_y: Tensor, row_start: int, self_offset: int | None) -> tuple[Tensor, Tensor]:
    """(positive, negative) boolean masks for anchor rows starting at global row `row_start`."""
    same = y[:, None] == ref_y[None, :]
    if self_offset is not None:
        rows = torch.arange(y.shape[0], device=y.device) + (row_start + self_offset)
        cols = torch.arange(ref_y.shape[0], device=y.device)
        same = same & (rows[:, None] != cols[None, :])
        return same, (y[:, None] != ref_y[None, :])
    return same, ~same

