"""Autograd wrapper launching the fused Triton kernels for a row program (see triton_kernels)."""
from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from unidml.kernels.pairwise.fused import KernelArgs
from unidml.kernels.pairwise.geometry import duplicate_tolerance, pair_metric, squared_norms
from unidml.kernels.pairwise.rows import RowProgram, fused_kernel_args
from unidml.runtime.device import on_device_of


def kernel_args(spec: RowProgram) -> KernelArgs:
    """The fused kernels' arguments for `spec` (ValueError if it has no kernel)."""
    args = fused_kernel_args(spec)
    if args is None:
        raise ValueError(f"no triton kernel for {spec.name}")
    return args


def _blocks(d: int) -> dict[str, int]:
    """Tile sizes (small under the interpreter so tiny test inputs still span several tiles)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": min(128, max(16, 1 << (d - 1).bit_length()))}


def _dot_f32() -> bool:
    """Upcast half tiles before tl.dot: only under the interpreter (its bf16 dot is unfaithful)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonRows(torch.autograd.Function):
    """(x, r) -> per-row (sums, counts) via the fused kernels; backward recomputes tiles."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, spec: RowProgram, self_offset: int | None):
        from unidml.kernels.pairwise import triton_kernels as K

        x, r = x.contiguous(), r.contiguous()
        y32, ry32 = y.to(torch.int32).contiguous(), ref_y.to(torch.int32).contiguous()
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
        blocks = _blocks(d)
        offset = 0 if self_offset is None else int(self_offset)
        K.rows_fwd[(triton.cdiv(n, blocks["BLOCK_M"]),)](
            x, r, x_sq, r_sq, y32, ry32, sums, counts, stats, idx, n, m, d, x.stride(0), r.stride(0), offset, tol,
            *args.params, LOSS=int(args.loss), POWER=args.power, REDUCTION=int(args.reduction), EUCLID=euclid,
            HAS_SELF=self_offset is not None, BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"],
            BLOCK_K=blocks["BLOCK_K"], DOT_F32=_dot_f32(), num_warps=4)
        ctx.save_for_backward(x, r, x_sq, r_sq, y32, ry32, stats, idx)
        ctx.args = (args, tol, euclid, self_offset, blocks)
        ctx.mark_non_differentiable(counts)
        return sums, counts

    @staticmethod
    def backward(ctx, grad_sums: Tensor, _grad_counts: Tensor):
        from unidml.kernels.pairwise import triton_kernels as K

        x, r, x_sq, r_sq, y32, ry32, stats, idx = ctx.saved_tensors
        args, tol, euclid, self_offset, blocks = ctx.args
        n, d = x.shape
        m = r.shape[0]
        grad_sums = grad_sums.float().contiguous()
        dx = torch.empty(n, d, dtype=torch.float32, device=x.device)
        dr = torch.empty(m, d, dtype=torch.float32, device=x.device)
        offset = 0 if self_offset is None else int(self_offset)
        common = dict(LOSS=int(args.loss), POWER=args.power, EUCLID=euclid, HAS_SELF=self_offset is not None,
                      DOT_F32=_dot_f32(), num_warps=8, **blocks)
        feature_blocks = triton.cdiv(d, blocks["BLOCK_D"])
        K.rows_bwd_dx[(triton.cdiv(n, blocks["BLOCK_M"]), feature_blocks)](
            x, r, x_sq, r_sq, y32, ry32, grad_sums, stats, idx, dx, n, m, d, x.stride(0), r.stride(0), offset, tol,
            *args.params, **common)
        K.rows_bwd_dr[(triton.cdiv(m, blocks["BLOCK_N"]), feature_blocks)](
            x, r, x_sq, r_sq, y32, ry32, grad_sums, stats, idx, dr, n, m, d, x.stride(0), r.stride(0), offset, tol,
            *args.params, **common)
        return dx.to(x.dtype), dr.to(r.dtype), None, None, None, None


def triton_rows(spec: RowProgram, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor,
                self_offset: int | None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts) of `spec` from the fused Triton kernels."""
    with on_device_of(x):  # Triton launches on the current device; autograd runs backward on x's device
        return TritonRows.apply(x, r, y, ref_y, spec, self_offset)

