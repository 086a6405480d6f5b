"""Autograd wrapper launching the fused classifier-score kernels (see triton_kernels).

The kernels produce the row / column log-sum-exps and the tile-accumulated dX, dV and dbias; the
O((n + c)·d) rest (target dots, Σ_k v_k, their gradients and the normalisation chain) is plain torch,
shared with the tiled backend.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from unidml.kernels.classifier.common import (
    ClassScores,
    compute_dtype,
    fp32_dot_precision,
    inverse_norms,
    normalize_backward_,
    target_vectors,
)
from unidml.kernels.classifier.tiled import default_chunk_classes
from unidml.runtime.device import on_device_of


def _dot_flags(x: Tensor, w: Tensor) -> dict:
    """The kernels' compute dtype and fp32 precision (`common.compute_dtype`, `common.fp32_dot_precision`)."""
    import triton.language as tl

    dtype = compute_dtype(x.dtype, w.dtype)
    as_tl = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    return {"DOT": as_tl, "PRECISION": fp32_dot_precision() if dtype == torch.float32 else "ieee"}


def _weight_sum(w: Tensor, inv_norm: Tensor | None) -> Tensor:
    """Σ_k v_k as one matrix-vector product (no (c, d) temporary)."""
    ones = inv_norm if inv_norm is not None else torch.ones(w.shape[0], device=w.device)
    return ones @ w.float()


class TritonClassScores(torch.autograd.Function):
    """(x, w, bias) -> ClassScores via the fused kernels; backward recomputes tiles."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, targets: Tensor, scale: float, normalize: bool,
                rows: bool, columns: bool):
        from unidml.kernels.classifier import triton_kernels as K

        x, w = x.contiguous(), w.contiguous()
        t32 = targets.to(torch.int32).contiguous()
        n, d = x.shape
        c = w.shape[0]
        inv_norm = inverse_norms(w) if normalize else None
        args = _launch_args(x, w, bias, inv_norm, t32, scale, normalize)
        row_lse = torch.empty(n if rows else 0, dtype=torch.float32, device=x.device)
        dot = _dot_flags(x, w)
        if rows:
            K.fwd_rows[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)](*args["head"], row_lse, *args["sizes"],
                                                                       **args["flags"], **dot)
        col_lse = torch.empty(c if columns else 0, dtype=torch.float32, device=x.device)
        if columns:
            K.fwd_cols[lambda meta: (triton.cdiv(c, meta["BLOCK_N"]),)](*args["head"], col_lse, *args["sizes"],
                                                                       **args["flags"], **dot)
        v_t, _ = target_vectors(w, inv_norm, targets)
        target = (x.float() * v_t).sum(1)
        ctx.save_for_backward(x, w, bias, targets, row_lse, col_lse)
        ctx.scale, ctx.normalize, ctx.rows, ctx.columns = scale, normalize, rows, columns
        ctx.set_materialize_grads(False)
        return row_lse, target, col_lse, _weight_sum(w, inv_norm)

    @staticmethod
    def backward(ctx, g_row: Tensor | None, g_target: Tensor | None, g_col: Tensor | None,
                 g_wsum: Tensor | None):
        from unidml.kernels.classifier import triton_kernels as K

        x, w, bias, targets, row_lse, col_lse = ctx.saved_tensors
        n, d = x.shape
        c = w.shape[0]
        inv_norm = inverse_norms(w) if ctx.normalize else None
        args = _launch_args(x, w, bias, inv_norm, targets.to(torch.int32).contiguous(), ctx.scale, ctx.normalize)
        dx = torch.zeros(n, d, dtype=torch.float32, device=x.device)
        dv = torch.zeros(c, d, dtype=torch.float32, device=x.device)
        db = None if bias is None else torch.zeros(c, dtype=torch.float32, device=x.device)
        has_row, has_col = g_row is not None and ctx.rows, g_col is not None and ctx.columns
        if has_row or has_col:
            dummy = row_lse.new_zeros(1)
            grads = (g_row.float().contiguous() if has_row else dummy, row_lse if has_row else dummy,
                     g_col.float().contiguous() if has_col else dummy, col_lse if has_col else dummy)
            common = dict(**args["flags"], HAS_ROW=has_row, HAS_COL=has_col, **_dot_flags(x, w))
            K.bwd_dx[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]))](
                *args["head"], *grads, dx, *args["sizes"], **common)
            K.bwd_dv[lambda meta: (triton.cdiv(c, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"]))](
                *args["head"], *grads, dv, dummy if db is None else db, *args["sizes"], **common)
        if g_target is not None:
            v_t, has = target_vectors(w, inv_norm, targets)
            gt = g_target.float() * has  # rows without a target in this block add 0 to class 0
            dx.addcmul_(v_t, gt[:, None])
            dv.index_add_(0, targets.clamp_min(0), x.float() * gt[:, None])
        if g_wsum is not None:
            dv += g_wsum.float()[None, :]
        if ctx.normalize:
            normalize_backward_(dv, w, inv_norm, default_chunk_classes(d))
        return (dx.to(x.dtype), dv.to(w.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None)


def _launch_args(x: Tensor, w: Tensor, bias: Tensor | None, inv_norm: Tensor | None, t32: Tensor, scale: float,
                 normalize: bool) -> dict:
    """Pointers, sizes and flags every kernel takes, in the kernels' argument order."""
    dummy = x.new_zeros(1, dtype=torch.float32)
    return {
        "head": (x, w, dummy if inv_norm is None else inv_norm,
                 dummy if bias is None else bias.float().contiguous(), t32),
        "sizes": (x.shape[0], w.shape[0], x.shape[1], x.stride(0), w.stride(0), float(scale)),
        "flags": {"NORMALIZE": normalize, "HAS_BIAS": bias is not None},
    }


def triton_scores(x: Tensor, w: Tensor, bias: Tensor | None, targets: Tensor, scale: float, normalize: bool,
                  rows: bool, columns: bool) -> ClassScores:
    """ClassScores of (x, w, bias) from the fused Triton kernels."""
    with on_device_of(x):  # Triton launches on the current device; autograd runs backward on x's device
        return ClassScores(*TritonClassScores.apply(x, w, bias, targets.long(), float(scale), normalize, rows,
                                                    columns))
