"""Tiled backend: row chunks of the matrix, O((n+m)·d + chunk·m) memory, recomputing backward.

Forward keeps only per-row sums, counts and a few per-row statistics. Backward recomputes each
chunk's pair values, forms G = dL/dV for that chunk and accumulates dX = G·R and dR = Gᵀ·X as
matmuls, so no n x m tensor ever exists.

Row programs with a closed-form chunk gradient (`rows.ChunkedRowProgram`: contrastive,
multi-similarity, SNCA, SupCon) touch every pair with a handful of dense ops and handle the few
positives through per-row column lists (`SameColumns`). Any other row program (triplet) falls back
to autograd on the chunk's dense `rows`. Pair values follow the duplicate rule of `geometry`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unidml.kernels.pairwise.geometry import PairMetric, duplicate_tolerance, pair_masks, pair_metric, squared_norms
from unidml.kernels.pairwise.rows import ChunkedRowProgram, RowProgram, SparseChunkedRowProgram

CHUNK_ELEMENTS = 1 << 21  # 8 MiB of fp32 per chunk-sized temporary


def default_chunk_rows(m: int) -> int:
    """Rows per chunk so a chunk x m temporary holds about CHUNK_ELEMENTS values."""
    return max(8, CHUNK_ELEMENTS // max(m, 1))


@dataclass
class SameColumns:
    """Per anchor row, the reference columns sharing its label (padded to the longest row).

    cols (c, P) column ids (padding repeats arbitrary columns); valid (c, P): a real same-label
    entry (self included); pos (c, P): a positive (valid and not self); self_col (c,): -1 if none.
    Padded entries may alias real columns: only read them under a mask, and write through
    `scatter_add_` of masked (zero) values.
    """
    cols: Tensor
    valid: Tensor
    pos: Tensor
    self_col: Tensor


class LabelIndex:
    """Reference labels sorted once, so each chunk finds its same-label columns in O(c log m + c·P)."""

    def __init__(self, ref_y: Tensor) -> None:
        self.sorted, self.order = torch.sort(ref_y.long(), stable=True)
        self.m = ref_y.shape[0]

    def columns(self, y_chunk: Tensor, start: int, self_offset: int | None) -> SameColumns:
        y_chunk = y_chunk.long()
        lo = torch.searchsorted(self.sorted, y_chunk)
        hi = torch.searchsorted(self.sorted, y_chunk, right=True)
        length = hi - lo
        width = max(int(length.max()), 1)
        ar = torch.arange(width, device=y_chunk.device)
        valid = ar[None, :] < length[:, None]
        cols = self.order[(lo[:, None] + ar[None, :]).clamp(max=self.m - 1)]
        if self_offset is None:
            self_col = torch.full_like(y_chunk, -1)
        else:
            self_col = torch.arange(y_chunk.shape[0], device=y_chunk.device) + (start + self_offset)
            self_col = torch.where(self_col < self.m, self_col, -1)
        pos = valid & (cols != self_col[:, None])
        return SameColumns(cols, valid, pos, self_col)


@dataclass(frozen=True)
class Geometry:
    """What every chunk of one call shares: the metric, the duplicate tolerance and the squared norms."""

    metric: PairMetric
    tol: float
    x_sq: Tensor
    r_sq: Tensor

    @classmethod
    def of(cls, spec: RowProgram, x: Tensor, r: Tensor) -> Geometry:
        return cls(pair_metric(spec.metric), duplicate_tolerance(x.shape[1]), squared_norms(x), squared_norms(r))


def chunk_values(x_chunk: Tensor, r: Tensor, geom: Geometry, start: int) -> Tensor:
    """V of the chunk of anchor rows starting at `start` (a new tensor, no autograd)."""
    return geom.metric.block_values(x_chunk, r, geom.x_sq[start:start + x_chunk.shape[0]], geom.r_sq, geom.tol)


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _autograd_chunk(spec: RowProgram, v: Tensor, y_chunk: Tensor, ref_y: Tensor, start: int, self_offset: int | None):
    pos, neg = pair_masks(y_chunk, ref_y, start, self_offset)
    return spec.rows(v, pos, neg, pos | neg)


class TiledRows(torch.autograd.Function):
    """(x, r) -> per-row (sums, counts) of a row program, chunk by chunk."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, spec: RowProgram, self_offset: int | None,
                chunk: int) -> tuple[Tensor, Tensor]:
        geom = Geometry.of(spec, x, r)
        closed = isinstance(spec, ChunkedRowProgram)
        index = LabelIndex(ref_y) if closed else None
        sums, counts, saved = [], [], []
        for s, e in _spans(x.shape[0], chunk):
            v = chunk_values(x[s:e], r, geom, s)
            if closed:
                out = spec.chunk_forward(v, index.columns(y[s:e], s, self_offset), y[s:e], ref_y)
                saved.append(out[2])
            else:
                out = _autograd_chunk(spec, v, y[s:e], ref_y, s, self_offset)
            sums.append(out[0])
            counts.append(out[1])
        counts = torch.cat(counts)
        ctx.save_for_backward(x, r, y, ref_y, *([torch.cat(saved)] if closed else []))
        ctx.spec, ctx.self_offset, ctx.chunk, ctx.index = spec, self_offset, chunk, index
        ctx.mark_non_differentiable(counts)
        return torch.cat(sums), counts

    @staticmethod
    def backward(ctx, grad_sums: Tensor, _grad_counts: Tensor):
        x, r, y, ref_y, *saved = ctx.saved_tensors
        spec = ctx.spec
        geom = Geometry.of(spec, x, r)
        euclid = not geom.metric.is_inverted
        dx, dr = torch.empty_like(x), torch.zeros_like(r)
        r_scale = torch.zeros_like(r[:, 0]) if euclid else None
        for s, e in _spans(x.shape[0], ctx.chunk):
            if saved and _sparse_backward(spec, x[s:e], r, geom, s, ctx.index.columns(y[s:e], s, ctx.self_offset),
                                          saved[0][s:e], grad_sums[s:e], dx[s:e], dr):
                continue
            v = chunk_values(x[s:e], r, geom, s)
            if saved:
                g = spec.chunk_grad(v, ctx.index.columns(y[s:e], s, ctx.self_offset), y[s:e], ref_y,
                                    saved[0][s:e], grad_sums[s:e])
            else:
                with torch.enable_grad():
                    v.requires_grad_()
                    sums, _ = _autograd_chunk(spec, v, y[s:e], ref_y, s, ctx.self_offset)
                    g, = torch.autograd.grad(sums, v, grad_sums[s:e], allow_unused=True, materialize_grads=True)
            if euclid:  # dD_ij/dx_i = (x_i - r_j)/D_ij, dD_ij/dr_j = (r_j - x_i)/D_ij; 0 where D = 0 (snapped)
                g = torch.nan_to_num_(g.div_(v), nan=0.0, posinf=0.0, neginf=0.0)
                dx[s:e] = x[s:e] * g.sum(1, keepdim=True)
                dx[s:e].addmm_(g, r, alpha=-1.0)
                r_scale += g.sum(0)
                dr.addmm_(g.T, x[s:e], alpha=-1.0)
            else:
                torch.mm(g, r, out=dx[s:e])
                dr.addmm_(g.T, x[s:e])
        if euclid:
            dr += r * r_scale[:, None]
        return dx, dr, None, None, None, None, None


def _sparse_backward(spec: RowProgram, x_chunk: Tensor, r: Tensor, geom: Geometry, start: int, cols: SameColumns,
                     saved: Tensor, grad: Tensor, dx_chunk: Tensor, dr: Tensor) -> bool:
    """Backward of a chunk whose gradient lives on its positives only (e.g. contrastive with no active
    negative): O(c·P·d) on the gathered positives instead of recomputing the chunk. False if not
    applicable (the row program has no such case, or P is too wide for it to pay)."""
    if not isinstance(spec, SparseChunkedRowProgram) or not spec.sparse_chunk(saved):
        return False
    if cols.cols.numel() * x_chunk.shape[1] > 4 * CHUNK_ELEMENTS:
        return False
    r_pos = r[cols.cols]  # (c, P, d)
    x_sq = geom.x_sq[start:start + x_chunk.shape[0], None]
    v = geom.metric.values(torch.einsum("cd,cpd->cp", x_chunk, r_pos), x_sq, geom.r_sq[cols.cols], geom.tol)
    if geom.metric.is_inverted:
        g = spec.positive_grad(v, cols, grad)
        dx_chunk.copy_(torch.einsum("cp,cpd->cd", g, r_pos))
        dr.index_add_(0, cols.cols.flatten(), (g[:, :, None] * x_chunk[:, None, :]).flatten(0, 1))
    else:
        diff = x_chunk[:, None, :] - r_pos
        h = torch.nan_to_num_(spec.positive_grad(v, cols, grad) / v, nan=0.0, posinf=0.0, neginf=0.0)
        dx_chunk.copy_(torch.einsum("cp,cpd->cd", h, diff))
        dr.index_add_(0, cols.cols.flatten(), (h[:, :, None] * -diff).flatten(0, 1))
    return True


def tiled_rows(spec: RowProgram, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, self_offset: int | None,
               chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts) of `spec`, computed in row chunks with a recomputing backward."""
    chunk = chunk_rows or default_chunk_rows(r.shape[0])
    return TiledRows.apply(x, r, y, ref_y, spec, self_offset, chunk)
