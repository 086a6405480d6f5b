"""Tiled backend: row chunks of the matrix, O((n+m)·d + chunk·m) memory, recomputing backward.

Forward keeps only per-row sums and counts. Backward recomputes each chunk's dot products, takes
dL/d(dots) of that chunk's rows (elementwise, via autograd on the chunk alone) and accumulates
dX = G·R and dR = Gᵀ·X as matmuls, so no n x m tensor ever exists.
"""
from __future__ import annotations

import torch
from torch import Tensor

from unidml.kernels.pairwise.geometry import pair_masks, pair_values

CHUNK_ELEMENTS = 1 << 20  # ~4 MiB of fp32 per chunk-sized temporary


def default_chunk_rows(m: int) -> int:
    """Rows per chunk so a chunk x m temporary holds about CHUNK_ELEMENTS values."""
    return max(8, CHUNK_ELEMENTS // max(m, 1))


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _chunk_sums(spec, x_chunk: Tensor, r: Tensor, y_chunk: Tensor, ref_y: Tensor, start: int,
                self_offset: int | None, r_sq: Tensor | None, track: bool):
    """(sums, counts, leaves) of one row chunk; leaves are the tensors dL/d(.) is taken against."""
    dots = x_chunk @ r.T
    x_sq = (x_chunk * x_chunk).sum(1) if r_sq is not None else None
    leaves = [dots] if r_sq is None else [dots, x_sq, r_sq]
    if track:
        leaves = [t.detach().requires_grad_() for t in leaves]
    v = pair_values(*leaves, spec.metric) if r_sq is not None else pair_values(leaves[0], None, None, spec.metric)
    pos, neg = pair_masks(y_chunk, ref_y, start, self_offset)
    sums, counts = spec.rows(v, pos, neg, pos | neg)
    return sums, counts, leaves


class TiledRows(torch.autograd.Function):
    """(x, r) -> per-row (sums, counts) of a row program, chunk by chunk."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, spec, self_offset: int | None,
                chunk: int) -> tuple[Tensor, Tensor]:
        r_sq = (r * r).sum(1) if spec.metric == "euclidean" else None
        parts = [_chunk_sums(spec, x[s:e], r, y[s:e], ref_y, s, self_offset, r_sq, track=False)[:2]
                 for s, e in _spans(x.shape[0], chunk)]
        sums = torch.cat([p[0] for p in parts])
        counts = torch.cat([p[1] for p in parts])
        ctx.save_for_backward(x, r, y, ref_y)
        ctx.spec, ctx.self_offset, ctx.chunk = spec, self_offset, chunk
        ctx.mark_non_differentiable(counts)
        return sums, counts

    @staticmethod
    def backward(ctx, grad_sums: Tensor, _grad_counts: Tensor):
        x, r, y, ref_y = ctx.saved_tensors
        euclid = ctx.spec.metric == "euclidean"
        r_sq = (r * r).sum(1) if euclid else None
        dx, dr = torch.empty_like(x), torch.zeros_like(r)
        for s, e in _spans(x.shape[0], ctx.chunk):
            with torch.enable_grad():
                sums, _, leaves = _chunk_sums(ctx.spec, x[s:e], r, y[s:e], ref_y, s, ctx.self_offset,
                                              r_sq, track=True)
                grads = torch.autograd.grad(sums, leaves, grad_sums[s:e], allow_unused=True,
                                            materialize_grads=True)
            g = grads[0]
            dx[s:e] = g @ r
            dr.addmm_(g.T, x[s:e])
            if euclid:  # d(‖x‖²)/dx = 2x, d(‖r‖²)/dr = 2r
                dx[s:e] += 2.0 * x[s:e] * grads[1][:, None]
                dr += 2.0 * r * grads[2][:, None]
        return dx, dr, None, None, None, None, None


def tiled_rows(spec, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, self_offset: int | None,
               chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts) of `spec`, computed in row chunks with a recomputing backward."""
    chunk = chunk_rows or default_chunk_rows(r.shape[0])
    return TiledRows.apply(x, r, y, ref_y, spec, self_offset, chunk)
