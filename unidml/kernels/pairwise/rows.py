"""Row programs: each pairwise loss as per-anchor sums over one block of rows of V.

Every row program is a `RowProgram`: `rows(v, pos, neg, not_self)` returns `(sums, counts)`, both
(rows, 2): column 0 is the tightness part, column 1 the contrast part. `sums` is differentiable in
`v`; `counts` are piecewise constant. The loss is `T/max(N_t, 1) + C/max(N_c, 1)` with T, C, N_t, N_c
the column totals over all anchors, so any backend that produces the same per-row sums (whole
matrix, row chunks, fused kernel, or several ranks) gives the same loss and gradient. `rows` is
written for autograd on dense masks: it is all the reference and tiled backends need.

Optional capabilities, each a Protocol the backends test with isinstance:
- `OracleRowProgram.reference_rows`: an explicit (slower) form the reference backend prefers.
- `ChunkedRowProgram`: closed forms on a chunk of V with the same-label columns listed per row
  (`tiled.SameColumns`): `chunk_forward(v, cols, y, ref_y) -> (sums, counts, saved)` and
  `chunk_grad(v, cols, y, ref_y, saved, grad_sums) -> dL/dV`; both may overwrite `v`.
- `SparseChunkedRowProgram`: a chunk whose gradient lives on its positives only
  (`sparse_chunk(saved)`), with that gradient from the gathered positive values (`positive_grad`).
- `FusedRowProgram.kernel_args()`: the fused Triton kernel's arguments, or None without a kernel.

V follows the duplicate rule of `geometry` (snapped values); every hinge or mining decision here is
taken strictly on those values, so all backends agree on duplicated embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from unidml.kernels.pairwise.fused import REDUCTION_IDS, KernelArgs, LossId
from unidml.kernels.pairwise.geometry import pair_metric

if TYPE_CHECKING:
    from unidml.kernels.pairwise.tiled import SameColumns

NEG_INF = float("-inf")
TRIPLET_ORACLE_ELEMENTS = 1 << 25  # (chunk, m, m) elements per chunk of the triplet oracle


@runtime_checkable
class RowProgram(Protocol):
    """A pairwise loss as per-anchor (sums, counts) over a dense block of V."""

    @property
    def name(self) -> str: ...

    @property
    def metric(self) -> str: ...

    def rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class OracleRowProgram(RowProgram, Protocol):
    def reference_rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class ChunkedRowProgram(RowProgram, Protocol):
    def chunk_forward(self, v: Tensor, cols: SameColumns, y: Tensor,
                      ref_y: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...

    def chunk_grad(self, v: Tensor, cols: SameColumns, y: Tensor, ref_y: Tensor, saved: Tensor,
                   grad: Tensor) -> Tensor: ...


@runtime_checkable
class SparseChunkedRowProgram(ChunkedRowProgram, Protocol):
    def sparse_chunk(self, saved: Tensor) -> bool: ...

    def positive_grad(self, pos_v: Tensor, cols: SameColumns, grad: Tensor) -> Tensor: ...


@runtime_checkable
class FusedRowProgram(RowProgram, Protocol):
    def kernel_args(self) -> KernelArgs | None: ...


def fused_kernel_args(spec: RowProgram) -> KernelArgs | None:
    """The fused kernel's arguments of `spec`; None where it has no kernel."""
    return spec.kernel_args() if isinstance(spec, FusedRowProgram) else None


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


def _set_self(v: Tensor, cols, value: float) -> Tensor:
    """Write `value` at each row's self column (in place, O(rows))."""
    rows = torch.nonzero(cols.self_col >= 0).squeeze(1)
    v[rows, cols.self_col[rows]] = value
    return v


def _counts(a: Tensor, b: Tensor) -> Tensor:
    return torch.stack([a, b], dim=1).to(torch.float32)


@dataclass(frozen=True)
class ContrastiveRows:
    """Σ_pos (u - m_pos)_+^p and Σ_neg (m_neg - u)_+^p on u = sign·V; counts per `reduction`.

    `chunk_forward` / `chunk_grad` are the tiled backend's closed forms: the negative part is dense
    over the chunk with same-label entries masked out, the positive part is gathered per row.
    """
    pos_margin: float
    neg_margin: float
    power: int
    reduction: str
    metric: str
    name = "contrastive"

    def _pos_part(self, v: Tensor) -> Tensor:
        """relu(u - m_pos), a new tensor."""
        return pair_metric(self.metric).beyond(v, self.pos_margin).clamp_min_(0.0)

    def _neg_part(self, v: Tensor, same: Tensor) -> Tensor:
        """relu(m_neg - u) with same-label entries zeroed, a new tensor."""
        return pair_metric(self.metric).within(v, self.neg_margin).clamp_min_(0.0).masked_fill_(same, 0.0)

    def kernel_args(self) -> KernelArgs:
        geom = pair_metric(self.metric)
        params = (geom.margin(self.pos_margin), geom.margin(self.neg_margin), geom.sign, 0.0)
        return KernelArgs(LossId.CONTRASTIVE, params, self.power, REDUCTION_IDS[self.reduction])

    def chunk_forward(self, v: Tensor, cols, y: Tensor, ref_y: Tensor):
        neg = self._neg_part(v, y[:, None] == ref_y[None, :])
        pos = torch.where(cols.pos, self._pos_part(v.gather(1, cols.cols)), 0.0)
        if self.power == 2:
            neg.square_()
            pos.square_()
        if self.reduction == "mean_nonzero":
            counts = _counts(torch.count_nonzero(pos, 1), torch.count_nonzero(neg, 1))
        elif self.reduction == "mean":
            counts = _counts(cols.pos.sum(1), v.shape[1] - cols.valid.sum(1))
        else:
            counts = torch.ones(v.shape[0], 2, device=v.device)
        active_neg = torch.count_nonzero(neg, 1).to(v.dtype)[:, None]
        return _stack(pos.sum(1), neg.sum(1)), counts, active_neg

    def sparse_chunk(self, saved: Tensor) -> bool:
        """No active negative in the chunk: its gradient lives on the positives only."""
        return not bool(saved.any())

    def positive_grad(self, pos_v: Tensor, cols, grad: Tensor) -> Tensor:
        """dL/dV at the gathered same-label columns (zero off the positives)."""
        sign = pair_metric(self.metric).sign
        pos = torch.where(cols.pos, self._pos_part(pos_v), 0.0)
        if self.power == 2:  # d/dv relu(u - m)² = 2·sign·relu(...)
            return pos * (grad[:, 0:1] * (2.0 * sign))
        return (pos > 0) * (grad[:, 0:1] * sign)

    def chunk_grad(self, v: Tensor, cols, y: Tensor, ref_y: Tensor, saved: Tensor, grad: Tensor) -> Tensor:
        sign = pair_metric(self.metric).sign
        neg = self._neg_part(v, y[:, None] == ref_y[None, :])
        if self.power == 2:  # d/dv relu(m - u)² = -2·sign·relu(...)
            g = neg.mul_(grad[:, 1:2] * (-2.0 * sign))
        else:
            g = neg.gt_(0.0).mul_(grad[:, 1:2] * -sign)
        return g.scatter_add_(1, cols.cols, self.positive_grad(v.gather(1, cols.cols), cols, grad))

    def rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        geom = pair_metric(self.metric)
        zero = torch.zeros_like(v)
        pos_loss = torch.where(pos, torch.relu(geom.beyond(v, self.pos_margin)), zero) ** self.power
        neg_loss = torch.where(neg, torch.relu(geom.within(v, self.neg_margin)), zero) ** self.power
        if self.reduction == "mean_nonzero":
            counts = _stack((pos_loss > 0).sum(1), (neg_loss > 0).sum(1))
        elif self.reduction == "mean":
            counts = _stack(pos.sum(1), neg.sum(1))
        else:  # per_anchor: (1/n) Σ_i Σ_j (docs/design.md, "Losses")
            counts = torch.ones(v.shape[0], 2, dtype=torch.long, device=v.device)
        return _stack(pos_loss.sum(1), neg_loss.sum(1)), counts.to(v.dtype)


@dataclass(frozen=True)
class MultiSimilarityRows:
    """Multi-similarity with its miner (PML's MultiSimilarityLoss + MultiSimilarityMiner).

    `mine=False` keeps every pair of the masks (PML's loss on pairs another miner chose); only `rows`
    honours it, so such a spec is for the reference backend alone (the loss's `indices_tuple` path).
    """
    alpha: float
    beta: float
    base: float
    epsilon: float
    metric: str = "cosine"
    mine: bool = True
    name = "multi_similarity"

    def kernel_args(self) -> KernelArgs:
        return KernelArgs(LossId.MULTI_SIMILARITY, (self.alpha, self.beta, self.base, self.epsilon))

    def rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        s = v.detach()
        hardest_neg = torch.where(neg, s, torch.full_like(s, NEG_INF)).amax(1, keepdim=True)
        easiest_pos = torch.where(pos, s, torch.full_like(s, float("inf"))).amin(1, keepdim=True)
        keep_pos = pos & (s - self.epsilon < hardest_neg) if self.mine else pos
        keep_neg = neg & (s + self.epsilon > easiest_pos) if self.mine else neg
        tight = masked_logsumexp(-self.alpha * (v - self.base), keep_pos, add_one=True) / self.alpha
        contrast = masked_logsumexp(self.beta * (v - self.base), keep_neg, add_one=True) / self.beta
        return _stack(tight, contrast), torch.ones(v.shape[0], 2, dtype=v.dtype, device=v.device)

    def _kept_negatives(self, v: Tensor, y: Tensor, ref_y: Tensor, easiest_pos: Tensor) -> Tensor:
        """v with same-label entries and unmined negatives set to -inf (a new tensor)."""
        v_neg = v.masked_fill(y[:, None] == ref_y[None, :], NEG_INF)
        return v_neg.masked_fill_(torch.add(v_neg, self.epsilon) <= easiest_pos[:, None], NEG_INF)

    def _kept_positives(self, v: Tensor, cols, hardest_neg: Tensor) -> tuple[Tensor, Tensor]:
        pos_v = v.gather(1, cols.cols)
        return pos_v, cols.pos & (pos_v - self.epsilon < hardest_neg[:, None])

    def chunk_forward(self, v: Tensor, cols, y: Tensor, ref_y: Tensor):
        """Closed form for the tiled backend; saves (hardest neg, easiest pos, lse_pos, lse_neg)."""
        hardest_neg = v.masked_fill(y[:, None] == ref_y[None, :], NEG_INF).amax(1)
        pos_v, kept_pos = self._kept_positives(v, cols, hardest_neg)
        easiest_pos = torch.where(cols.pos, pos_v, float("inf")).amin(1)
        lse_pos = masked_logsumexp(-self.alpha * (pos_v - self.base), kept_pos, add_one=True)
        # The largest kept negative is the hardest one (when any is kept): shift by it, and by the "1 +".
        # log(1 + e^shift·total) as logaddexp(0, shift + log total): no kept negative gives exactly 0,
        # where shift + log(total + e^-shift) is -inf once e^-shift underflows (shift > ~103).
        shift = (self.beta * (hardest_neg - self.base)).clamp_min(0.0)
        v_neg = self._kept_negatives(v, y, ref_y, easiest_pos)
        total = v_neg.mul_(self.beta).add_((-self.beta * self.base - shift)[:, None]).exp_().sum(1)
        lse_neg = torch.logaddexp(torch.zeros_like(shift), shift + torch.log(total))
        counts = torch.ones(v.shape[0], 2, dtype=v.dtype, device=v.device)
        saved = torch.stack([hardest_neg, easiest_pos, lse_pos, lse_neg], dim=1)
        return _stack(lse_pos / self.alpha, lse_neg / self.beta), counts, saved

    def chunk_grad(self, v: Tensor, cols, y: Tensor, ref_y: Tensor, saved: Tensor, grad: Tensor) -> Tensor:
        hardest_neg, easiest_pos, lse_pos, lse_neg = saved.unbind(1)
        pos_v, kept_pos = self._kept_positives(v, cols, hardest_neg)
        pull = torch.where(kept_pos, torch.exp(-self.alpha * (pos_v - self.base) - lse_pos[:, None]), 0.0)
        v_neg = self._kept_negatives(v, y, ref_y, easiest_pos)
        push = v_neg.mul_(self.beta).add_((-self.beta * self.base - lse_neg)[:, None]).exp_()
        return push.mul_(grad[:, 1:2]).scatter_add_(1, cols.cols, pull * -grad[:, 0:1])


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

    def kernel_args(self) -> KernelArgs:
        return KernelArgs(LossId.SUPCON if self.per_positive else LossId.SNCA, (self.temperature, 0.0, 0.0, 0.0))

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

    def _exp(self, v: Tensor, cols, row_max: Tensor) -> Tensor:
        """E = exp((v - row max)/σ) with the self column at 0, in place on v."""
        _set_self(v, cols, NEG_INF)
        return v.sub_(row_max[:, None]).mul_(1.0 / self.temperature).exp_()

    def _positive_weights(self, pos_v: Tensor, cols) -> tuple[Tensor, Tensor]:
        """(max positive similarity, Σ_pos exp((v - max)/σ)) per row, on the gathered positives."""
        pos_max = torch.where(cols.pos, pos_v, NEG_INF).amax(1)
        pos_max = torch.where(torch.isfinite(pos_max), pos_max, 0.0)
        w = torch.where(cols.pos, ((pos_v - pos_max[:, None]) / self.temperature).exp(), 0.0)
        return pos_max, w

    def chunk_forward(self, v: Tensor, cols, y: Tensor, ref_y: Tensor):
        """Closed form for the tiled backend; saves (row max, Σ_{k≠i} E, #pos) per row."""
        pos_v = v.gather(1, cols.cols)
        row_max = _set_self(v, cols, NEG_INF).amax(1)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        total = self._exp(v, cols, row_max).sum(1)
        n_pos = cols.pos.sum(1).to(v.dtype)
        valid = n_pos > 0
        contrast = torch.where(valid, row_max / self.temperature + torch.log(total), 0.0)
        if self.per_positive:
            pull = torch.where(cols.pos, pos_v, 0.0).sum(1) / (self.temperature * n_pos.clamp(min=1))
        else:
            pos_max, w = self._positive_weights(pos_v, cols)
            pull = pos_max / self.temperature + torch.log(w.sum(1).clamp(min=1e-30))
        tight = torch.where(valid, -pull, 0.0)
        counts = valid.to(v.dtype)[:, None].expand(-1, 2)
        return _stack(tight, contrast), counts, torch.stack([row_max, total, n_pos], dim=1)

    def chunk_grad(self, v: Tensor, cols, y: Tensor, ref_y: Tensor, saved: Tensor, grad: Tensor) -> Tensor:
        row_max, total, n_pos = saved.unbind(1)
        valid = (n_pos > 0).to(v.dtype)
        if self.per_positive:
            pull = cols.pos * (valid * grad[:, 0] / (-self.temperature * n_pos.clamp(min=1)))[:, None]
        else:
            _, w = self._positive_weights(v.gather(1, cols.cols), cols)
            pull = w * (valid * grad[:, 0] / (-self.temperature * w.sum(1).clamp(min=1e-30)))[:, None]
        push = valid * grad[:, 1] / (self.temperature * total.clamp(min=1e-30))
        return self._exp(v, cols, row_max).mul_(push[:, None]).scatter_add_(1, cols.cols, pull)


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

    def kernel_args(self) -> KernelArgs:
        """Batch-hard: one pass of row statistics; all / semi-hard: the triplet kernels (`triton_triplet`)."""
        sign = pair_metric(self.metric).sign
        if self.mining == "batch_hard":
            return KernelArgs(LossId.BATCH_HARD_TRIPLET, (self.margin, 0.0, sign, 0.0))
        return KernelArgs(LossId.TRIPLET, (self.margin, float(self.mining == "semi_hard"), sign, 0.0))

    def rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        u = pair_metric(self.metric).dissimilarity(v)
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
        """Every (anchor, positive, negative) enumerated, a chunk of anchors at a time so the (c, m, m)
        temporaries stay under TRIPLET_ORACLE_ELEMENTS; only per-pair counts (c, m) outlive a chunk."""
        u = pair_metric(self.metric).dissimilarity(v)
        if self.mining == "batch_hard":
            return self._batch_hard(u, pos, neg)
        m = u.shape[1]
        chunk = TRIPLET_ORACLE_ELEMENTS // max(m * m, 1)
        if chunk == 0:
            raise ValueError(f"triplet mining '{self.mining}' on the reference backend enumerates m² = {m * m} "
                             f"triplets per anchor (over {TRIPLET_ORACLE_ELEMENTS}); use backend 'tiled'")
        per_pos, per_neg = [], []
        with torch.no_grad():
            for s in range(0, u.shape[0], chunk):
                per_pos_chunk, per_neg_chunk = self._triplet_counts(u[s:s + chunk], pos[s:s + chunk], neg[s:s + chunk])
                per_pos.append(per_pos_chunk)
                per_neg.append(per_neg_chunk)
        per_pos, per_neg = torch.cat(per_pos), torch.cat(per_neg)
        # Σ over active triplets of u_ap and of (margin - u_an): each pair value times its triplet count
        # (piecewise constant, so autograd gives the triplets' gradient).
        tight = (per_pos * u).sum(1)
        contrast = (per_neg * (self.margin - u)).sum(1)
        count = per_neg.sum(1)
        return _stack(tight, contrast), torch.stack([count, count], dim=1)

    def _triplet_counts(self, u: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        """Per anchor row, how many active triplets each positive and each negative column is in."""
        gap = u[:, None, :] - u[:, :, None]  # [i, p, n] = u_an - u_ap
        active = pos[:, :, None] & neg[:, None, :] & (gap < self.margin)
        if self.mining == "semi_hard":
            active &= gap > 0
        return active.sum(2).to(u.dtype), active.sum(1).to(u.dtype)

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
