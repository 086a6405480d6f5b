"""Autograd wrapper launching the fused Triton kernels for a row program (see triton_kernels)."""
from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from unidml.kernels.pairwise.fused import KernelArgs, LossId
from unidml.kernels.pairwise.geometry import duplicate_tolerance, pair_metric, squared_norms
from unidml.kernels.pairwise.rows import RowProgram, fused_kernel_args
from unidml.runtime.device import on_device_of


def kernel_args(spec: RowProgram) -> KernelArgs:
    """The fused kernels' arguments for `spec` (ValueError if it has no kernel)."""
    args = fused_kernel_args(spec)
    if args is None:
        raise ValueError(f"no triton kernel for {spec.name}")
    return args


def feature_block(d: int) -> int:
    """Feature columns per backward program: all of d up to 512 (each tile is then computed once per
    backward kernel), 512-wide blocks beyond; 16 under the interpreter so d = 20 spans two blocks."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16
    return min(512, max(16, triton.next_power_of_2(d)))


class TritonRows(torch.autograd.Function):
    """(x, r) -> per-row (sums, counts) via the fused kernels; backward recomputes tiles."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, spec: RowProgram, self_offset: int | None):
        from unidml.kernels.pairwise import triton_kernels as K

        x, r = x.contiguous(), r.contiguous()
        # Labels stay int64: an int32 copy would merge classes equal mod 2^32.
        y64, ry64 = y.to(torch.int64).contiguous(), ref_y.to(torch.int64).contiguous()
        n, d = x.shape
        m = r.shape[0]
        euclid = not pair_metric(spec.metric).is_inverted  # distances need the squared norms
        x_sq, r_sq = squared_norms(x).contiguous(), squared_norms(r).contiguous()
        args = kernel_args(spec)
        tol = duplicate_tolerance(d)
        sums = x.new_empty(n, 2, dtype=torch.float32)
        counts = x.new_empty(n, 2, dtype=torch.float32)
        stats = x.new_empty(n, 4, dtype=torch.float32)
        idx = x.new_empty(n, 2, dtype=torch.int32)
        offset = 0 if self_offset is None else int(self_offset)
        K.rows_fwd[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)](
            x, r, x_sq, r_sq, y64, ry64, sums, counts, stats, idx, n, m, d, x.stride(0), r.stride(0), offset, tol,
            *args.params, LOSS=int(args.loss), POWER=args.power, REDUCTION=int(args.reduction), EUCLID=euclid,
            HAS_SELF=self_offset is not None)
        ctx.save_for_backward(x, r, x_sq, r_sq, y64, ry64, stats, idx)
        ctx.args = (args, tol, euclid, self_offset)
        ctx.mark_non_differentiable(counts)
        return sums, counts

    @staticmethod
    def backward(ctx, grad_sums: Tensor, _grad_counts: Tensor):
        from unidml.kernels.pairwise import triton_kernels as K

        x, r, x_sq, r_sq, y64, ry64, stats, idx = ctx.saved_tensors
        args, tol, euclid, self_offset = ctx.args
        n, d = x.shape
        m = r.shape[0]
        grad_sums = grad_sums.float().contiguous()
        offset = 0 if self_offset is None else int(self_offset)
        block_d = feature_block(d)
        common = dict(LOSS=int(args.loss), POWER=args.power, EUCLID=euclid, HAS_SELF=self_offset is not None,
                      BLOCK_D=block_d)
        dx = dr = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(n, d, dtype=torch.float32, device=x.device)
            K.rows_bwd_dx[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, block_d))](
                x, r, x_sq, r_sq, y64, ry64, grad_sums, stats, idx, dx, n, m, d, x.stride(0), r.stride(0), offset,
                tol, *args.params, **common)
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[1]:  # not for detached references (a memory bank)
            dr = torch.empty(m, d, dtype=torch.float32, device=x.device)
            K.rows_bwd_dr[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), triton.cdiv(d, block_d))](
                x, r, x_sq, r_sq, y64, ry64, grad_sums, stats, idx, dr, n, m, d, x.stride(0), r.stride(0), offset,
                tol, *args.params, **common)
            dr = dr.to(r.dtype)
        return dx, dr, None, None, None, None


def _triplet_blocks(d: int) -> dict[str, int]:
    """Tile sizes of the triplet kernels (fixed: the dX kernel's atomic adds rule out autotuning's
    repeated launches): their (rows x KP x columns) compare and (rows x KP x features) gathers need
    smaller tiles than the other kernels."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16, "KP": 4}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": min(64, feature_block(d)), "KP": 8}


def positive_segments(y: Tensor, ref_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(order, lo, hi): reference columns sorted by label, and per anchor its label's segment
    [lo, hi) of them (its positives, plus itself when anchors are the references). No host sync."""
    sorted_y, order = torch.sort(ref_y, stable=True)
    lo = torch.searchsorted(sorted_y, y)
    hi = torch.searchsorted(sorted_y, y, right=True)
    return order.contiguous(), lo.contiguous(), hi.contiguous()


class TritonTripletRows(torch.autograd.Function):
    """(x, r) -> per-row (sums, counts) of the triplet loss over all / semi-hard triplets (`triton_triplet`)."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, spec: RowProgram, self_offset: int | None):
        from unidml.kernels.pairwise import triton_triplet as K

        x, r = x.contiguous(), r.contiguous()
        y64, ry64 = y.to(torch.int64).contiguous(), ref_y.to(torch.int64).contiguous()
        segments = positive_segments(y64, ry64)
        n, d = x.shape
        x_sq, r_sq = squared_norms(x).contiguous(), squared_norms(r).contiguous()
        args = kernel_args(spec)
        sums = x.new_empty(n, 2, dtype=torch.float32)
        counts = x.new_empty(n, 2, dtype=torch.float32)
        blocks = _triplet_blocks(d)
        euclid = not pair_metric(spec.metric).is_inverted
        ctx.common = dict(self_offset=0 if self_offset is None else int(self_offset), TOL=duplicate_tolerance(d),
                          MARGIN=args.params[0], SIGN=args.params[2], EUCLID=euclid, HAS_SELF=self_offset is not None,
                          SEMI_HARD=bool(args.params[1]), BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"],
                          BLOCK_K=blocks["BLOCK_K"], KP=blocks["KP"], num_warps=4)
        ctx.block_d = blocks["BLOCK_D"]
        K.triplet_fwd[(triton.cdiv(n, blocks["BLOCK_M"]),)](
            x, r, x_sq, r_sq, y64, ry64, *segments, sums, counts, n, r.shape[0], d, x.stride(0), r.stride(0),
            **ctx.common)
        ctx.save_for_backward(x, r, x_sq, r_sq, y64, ry64, *segments)
        ctx.mark_non_differentiable(counts)
        return sums, counts

    @staticmethod
    def backward(ctx, grad_sums: Tensor, _grad_counts: Tensor):
        from unidml.kernels.pairwise import triton_triplet as K

        x, r, x_sq, r_sq, y64, ry64, *segments = ctx.saved_tensors
        n, d = x.shape
        m = r.shape[0]
        grad_sums = grad_sums.float().contiguous()
        ref_grad = ctx.needs_input_grad[1]
        dx = torch.empty(n, d, dtype=torch.float32, device=x.device)
        # The positives' share of dR arrives by atomic adds; the negatives' is written by triplet_bwd_dr.
        dr_pos = torch.zeros(m, d, dtype=torch.float32, device=x.device) if ref_grad else dx
        r_scale = torch.zeros(m, dtype=torch.float32, device=x.device) if ref_grad else dx
        features = triton.cdiv(d, ctx.block_d)
        K.triplet_bwd_dx[(triton.cdiv(n, ctx.common["BLOCK_M"]), features)](
            x, r, x_sq, r_sq, y64, ry64, *segments, grad_sums, dx, dr_pos, r_scale, n, m, d, x.stride(0),
            r.stride(0), REF_GRAD=ref_grad, BLOCK_D=ctx.block_d, **ctx.common)
        if not ref_grad:
            return dx.to(x.dtype), None, None, None, None, None
        dr = torch.empty(m, d, dtype=torch.float32, device=x.device)
        K.triplet_bwd_dr[(triton.cdiv(m, ctx.common["BLOCK_N"]), features)](
            x, r, x_sq, r_sq, y64, ry64, *segments, grad_sums, dr, n, m, d, x.stride(0), r.stride(0),
            BLOCK_D=ctx.block_d, **ctx.common)
        dr += dr_pos
        if ctx.common["EUCLID"]:
            dr += r.float() * r_scale[:, None]
        return dx.to(x.dtype), dr.to(r.dtype), None, None, None, None


def triton_rows(spec: RowProgram, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor,
                self_offset: int | None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts) of `spec` from the fused Triton kernels."""
    with on_device_of(x):  # Triton launches on the current device; autograd runs backward on x's device
        if kernel_args(spec).loss == LossId.TRIPLET:
            return TritonTripletRows.apply(x, r, y, ref_y, spec, self_offset)
        return TritonRows.apply(x, r, y, ref_y, spec, self_offset)

