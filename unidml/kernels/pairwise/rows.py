"""Row programs: each pairwise loss as per-anchor sums over one block of rows of V.

`rows(v, pos, neg, not_self)` returns `(sums, counts)`, both (rows, 2): column 0 is the tightness
part, column 1 the contrast part. `sums` is differentiable in `v`; `counts` are piecewise constant.
The loss is `T/max(N_t, 1) + C/max(N_c, 1)` with T, C, N_t, N_c the column totals over all anchors,
so any backend that produces the same per-row sums (whole matrix, row chunks, fused kernel, or
several ranks) gives the same loss and gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")


def masked_logsumexp(a: Tensor, mask: Tensor, add_one: bool = False) -> Tensor:
    """Row log-sum-exp of `a` over `mask` (plus a zero term if `add_one`); 0 for empty rows, NaN-free."""
    if add_one:
        a = torch.cat([a, torch.zeros_like(a[:, :1])], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    any_kept = mask.any(dim=1, keepdim=True)
    safe = torch.where(mask, a, torch.where(any_kept, torch.full_like(a, NEG_INF), torch.zeros_like(a)))
    return torch.where(any_kept[:, 0], torch.logsumexp(safe, dim=1), torch.zeros_like(a[:, 0]))


def _stack(tight: Tensor, contrast: Tensor) -> Tensor:
    return torch.stack([tight, contrast], dim=1)


def dissimilarity(v: Tensor, metric: str) -> Tensor:
    """u: distance as is, similarity negated, so margin losses read the same for both metrics."""
    return v if metric == "euclidean" else -v


def oriented_margin(margin: float, metric: str) -> float:
    """A margin on V expressed on u (PML's `distance.margin` convention for inverted metrics)."""
    return margin if metric == "euclidean" else -margin


@dataclass(frozen=True)
class ContrastiveRows:
    """Σ_pos (u - m_pos)_+^p and Σ_neg (m_neg - u)_+^p; counts per `reduction`."""
    pos_margin: float
    neg_margin: float
    power: int
    reduction: str
    metric: str
    name = "contrastive"

    def rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        u = dissimilarity(v, self.metric)
        zero = torch.zeros_like(u)
        pos_loss = torch.where(pos, torch.relu(u - oriented_margin(self.pos_margin, self.metric)), zero) ** self.power
        neg_loss = torch.where(neg, torch.relu(oriented_margin(self.neg_margin, self.metric) - u), zero) ** self.power
        if self.reduction == "mean_nonzero":
            counts = _stack((pos_loss > 0).sum(1), (neg_loss > 0).sum(1))
        elif self.reduction == "mean":
            counts = _stack(pos.sum(1), neg.sum(1))
        else:  # per_anchor: (1/n) Σ_i Σ_j as in DESIGN §4
            counts = torch.ones(u.shape[0], 2, dtype=torch.long, device=u.device)
        return _stack(pos_loss.sum(1), neg_loss.sum(1)), counts.to(u.dtype)


@dataclass(frozen=True)
class MultiSimilarityRows:
    """Multi-similarity with its miner (PML's MultiSimilarityLoss + MultiSimilarityMiner)."""
    alpha: float
    beta: float
    base: float
    epsilon: float
    metric: str = "cosine"
    name = "multi_similarity"

    def rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        s = v.detach()
        hardest_neg = torch.where(neg, s, torch.full_like(s, NEG_INF)).amax(1, keepdim=True)
        easiest_pos = torch.where(pos, s, torch.full_like(s, float("inf"))).amin(1, keepdim=True)
        keep_pos = pos & (s - self.epsilon < hardest_neg)
        keep_neg = neg & (s + self.epsilon > easiest_pos)
        tight = masked_logsumexp(-self.alpha * (v - self.base), keep_pos, add_one=True) / self.alpha
        contrast = masked_logsumexp(self.beta * (v - self.base), keep_neg, add_one=True) / self.beta
        return _stack(tight, contrast), torch.ones(v.shape[0], 2, dtype=v.dtype, device=v.device)


@dataclass(frozen=True)
class SoftNeighbourRows:
    """SNCA (`per_positive=False`): -LSE_pos(S/σ) + LSE_{k≠i}(S/σ).

    SupCon (`per_positive=True`): -mean_pos(S/σ) + LSE_{k≠i}(S/σ). Anchors without a positive count 0.
    """
    temperature: float
    per_positive: bool
    metric: str = "cosine"

    @property
    def name(self) -> str:
        return "supcon" if self.per_positive else "snca"

    def rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        a = v / self.temperature
        n_pos = pos.sum(1)
        valid = n_pos > 0
        if self.per_positive:
            pull = torch.where(pos, a, torch.zeros_like(a)).sum(1) / n_pos.clamp(min=1)
        else:
            pull = masked_logsumexp(a, pos)
        zero = torch.zeros_like(pull)
        tight = torch.where(valid, -pull, zero)
        contrast = torch.where(valid, masked_logsumexp(a, not_self), zero)
        counts = valid.to(v.dtype)[:, None].expand(-1, 2)
        return _stack(tight, contrast), counts


@dataclass(frozen=True)
class TripletRows:
    """Triplet margin loss relu(u_ap - u_an + m) over mined triplets, averaged over non-zero ones.

    mining: `all` (every (p, n)), `semi_hard` (0 < u_an - u_ap < m) or `batch_hard` (hardest positive,
    hardest negative per anchor). tightness = Σ u_ap, contrast = Σ (m - u_an) over active triplets.
    `rows` counts triplets with a sort + searchsorted per row (O(m log m), no (m, m) tensor);
    `reference_rows` enumerates them explicitly (the oracle).
    """
    margin: float
    mining: str
    metric: str
    name = "triplet"

    def rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        u = dissimilarity(v, self.metric)
        if self.mining == "batch_hard":
            return self._batch_hard(u, pos, neg)
        inf = torch.full_like(u, float("inf"))
        pos_sorted, _ = torch.sort(torch.where(pos, u, inf), dim=1)
        n_pos = pos.sum(1, keepdim=True)
        finite = torch.where(torch.isinf(pos_sorted), torch.zeros_like(u), pos_sorted)
        prefix = torch.cat([torch.zeros_like(u[:, :1]), torch.cumsum(finite, dim=1)], dim=1)
        u_neg = u.detach().contiguous()
        low = torch.searchsorted(pos_sorted.detach().contiguous(), u_neg - self.margin, right=True)
        if self.mining == "semi_hard":
            high = torch.searchsorted(pos_sorted.detach().contiguous(), u_neg, right=False)
        else:
            high = n_pos.expand_as(low)
        low, high = low.clamp(max=n_pos), high.clamp(max=n_pos)
        k = torch.where(neg, (high - low).clamp(min=0), torch.zeros_like(low))
        high = torch.maximum(high, low)
        pos_sum = torch.where(neg, prefix.gather(1, high) - prefix.gather(1, low), torch.zeros_like(u))
        tight = pos_sum.sum(1)
        contrast = (k.to(u.dtype) * (self.margin - u)).sum(1)
        count = k.sum(1).to(u.dtype)
        return _stack(tight, contrast), torch.stack([count, count], dim=1)

    def reference_rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        u = dissimilarity(v, self.metric)
        if self.mining == "batch_hard":
            return self._batch_hard(u, pos, neg)
        gap = u[:, None, :] - u[:, :, None]  # [i, p, n] = u_an - u_ap
        active = pos[:, :, None] & neg[:, None, :] & (gap < self.margin)
        if self.mining == "semi_hard":
            active = active & (gap > 0)
        zero = torch.zeros_like(gap)
        tight = torch.where(active, u[:, :, None].expand_as(gap), zero).sum((1, 2))
        contrast = torch.where(active, (self.margin - u)[:, None, :].expand_as(gap), zero).sum((1, 2))
        count = active.sum((1, 2)).to(u.dtype)
        return _stack(tight, contrast), torch.stack([count, count], dim=1)

    def _batch_hard(self, u: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        hardest_pos = torch.where(pos, u, torch.full_like(u, NEG_INF)).max(1).values
        hardest_neg = torch.where(neg, u, torch.full_like(u, float("inf"))).min(1).values
        valid = pos.any(1) & neg.any(1)
        hardest_pos = torch.where(valid, hardest_pos, torch.zeros_like(hardest_pos))
        hardest_neg = torch.where(valid, hardest_neg, torch.zeros_like(hardest_neg))
        active = valid & (hardest_pos - hardest_neg + self.margin > 0)
        zero = torch.zeros_like(hardest_pos)
        tight = torch.where(active, hardest_pos, zero)
        contrast = torch.where(active, self.margin - hardest_neg, zero)
        count = active.to(u.dtype)
        return _stack(tight, contrast), torch.stack([count, count], dim=1)
