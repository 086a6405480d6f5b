"""Autograd wrapper launching the fused Triton kernels for a row program (see triton_kernels)."""
from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from unidml.kernels.pairwise.rows import oriented_margin

LOSS_IDS = {"contrastive": 0, "multi_similarity": 1, "snca": 2, "supcon": 3, "triplet": 4}
REDUCTION_IDS = {"mean_nonzero": 0, "mean": 1, "per_anchor": 2}


def _kernel_args(spec) -> tuple[int, tuple[float, float, float, float], int, int]:
    """(loss id, P0..P3, power, reduction id) of a row program, as the kernels read them."""
    sign = 1.0 if spec.metric == "euclidean" else -1.0
    if spec.name == "contrastive":
        params = (oriented_margin(spec.pos_margin, spec.metric), oriented_margin(spec.neg_margin, spec.metric),
                  sign, 0.0)
        return 0, params, spec.power, REDUCTION_IDS[spec.reduction]
    if spec.name == "multi_similarity":
        return 1, (spec.alpha, spec.beta, spec.base, spec.epsilon), 1, 0
    if spec.name in ("snca", "supcon"):
        return LOSS_IDS[spec.name], (spec.temperature, 0.0, 0.0, 0.0), 1, 0
    if spec.name == "triplet" and spec.mining == "batch_hard":
        return 4, (spec.margin, 0.0, sign, 0.0), 1, 0
    raise ValueError(f"no triton kernel for {spec.name}")


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
    def forward(ctx, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, spec, self_offset: int | None):
        from unidml.kernels.pairwise import triton_kernels as K

        x, r = x.contiguous(), r.contiguous()
        y32, ry32 = y.to(torch.int32).contiguous(), ref_y.to(torch.int32).contiguous()
        n, d = x.shape
        m = r.shape[0]
        euclid = spec.metric == "euclidean"
        x_sq = (x.float() ** 2).sum(1) if euclid else x.new_zeros(1, dtype=torch.float32)
        r_sq = (r.float() ** 2).sum(1) if euclid else x.new_zeros(1, dtype=torch.float32)
        loss_id, params, power, reduction = _kernel_args(spec)
        sums = x.new_empty(n, 2, dtype=torch.float32)
        counts = x.new_empty(n, 2, dtype=torch.float32)
        stats = x.new_empty(n, 4, dtype=torch.float32)
        idx = x.new_empty(n, 2, dtype=torch.int32)
        blocks = _blocks(d)
        offset = 0 if self_offset is None else int(self_offset)
        K.rows_fwd[(triton.cdiv(n, blocks["BLOCK_M"]),)](
            x, r, x_sq, r_sq, y32, ry32, sums, counts, stats, idx, n, m, d, x.stride(0), r.stride(0), offset,
            *params, LOSS=loss_id, POWER=power, REDUCTION=reduction, EUCLID=euclid,
            HAS_SELF=self_offset is not None, BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"],
            BLOCK_K=blocks["BLOCK_K"], DOT_F32=_dot_f32(), num_warps=4)
        ctx.save_for_backward(x, r, x_sq, r_sq, y32, ry32, stats, idx)
        ctx.args = (loss_id, params, power, euclid, self_offset, blocks)
        ctx.mark_non_differentiable(counts)
        return sums, counts

    @staticmethod
    def backward(ctx, grad_sums: Tensor, _grad_counts: Tensor):
        from unidml.kernels.pairwise import triton_kernels as K

        x, r, x_sq, r_sq, y32, ry32, stats, idx = ctx.saved_tensors
        loss_id, params, power, euclid, self_offset, blocks = ctx.args
        n, d = x.shape
        m = r.shape[0]
        grad_sums = grad_sums.float().contiguous()
        dx = torch.empty(n, d, dtype=torch.float32, device=x.device)
        dr = torch.empty(m, d, dtype=torch.float32, device=x.device)
        offset = 0 if self_offset is None else int(self_offset)
        common = dict(LOSS=loss_id, POWER=power, EUCLID=euclid, HAS_SELF=self_offset is not None,
                      DOT_F32=_dot_f32(), num_warps=8, **blocks)
        feature_blocks = triton.cdiv(d, blocks["BLOCK_D"])
        K.rows_bwd_dx[(triton.cdiv(n, blocks["BLOCK_M"]), feature_blocks)](
            x, r, x_sq, r_sq, y32, ry32, grad_sums, stats, idx, dx, n, m, d, x.stride(0), r.stride(0), offset,
            *params, **common)
        K.rows_bwd_dr[(triton.cdiv(m, blocks["BLOCK_N"]), feature_blocks)](
            x, r, x_sq, r_sq, y32, ry32, grad_sums, stats, idx, dr, n, m, d, x.stride(0), r.stride(0), offset,
            *params, **common)
        return dx.to(x.dtype), dr.to(r.dtype), None, None, None, None


def triton_rows(spec, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor,
                self_offset: int | None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts) of `spec` from the fused Triton kernels."""
    return TritonRows.apply(x, r, y, ref_y, spec, self_offset)

