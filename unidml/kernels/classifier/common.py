"""Pieces shared by the classifier-score backends: the output bundle, chunking, target lookup.

Every backend computes, for embeddings x (n, d) against one block of class weights w (c, d) with
optional bias b (c,), the logits l_ik = s·(x_i·v_k + b_k) where v_k = w_k (linear head) or
w_k/‖w_k‖ (normalised head), and returns only vectors:
  row_lse (n,)   LSE over k ≠ t_i of l_ik (−inf when a row has no such class; only if asked),
  target  (n,)   x_i·v_{t_i} (no scale, no bias; 0 where t_i = −1),
  col_lse (c,)   LSE over i with t_i ≠ k of l_ik (−inf when empty; only if asked),
  weight_sum (d,) Σ_k v_k (so Σ_k l_ik never needs the n × c matrix),
with t_i ∈ [0, c) the target's column in this block or −1 when the target lies outside it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from unidml.runtime.checks import check_range

NORM_EPS = 1e-12  # F.normalize's default epsilon


class ClassScores(NamedTuple):
    """The reductions of one weight block (see the module docstring)."""

    row_lse: Tensor
    target: Tensor
    col_lse: Tensor
    weight_sum: Tensor


def spans(total: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) chunks of `chunk` items covering `total`."""
    return [(s, min(s + chunk, total)) for s in range(0, total, chunk)]


HALF = (torch.bfloat16, torch.float16)


def compute_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The one dtype both operands of the fused kernels' matrix products take (fp32 accumulation):
    the half-precision one when either input is bf16 / fp16 (both half but different: bf16, whose
    range holds fp16's), else fp32."""
    halves = {dt for dt in (x_dtype, w_dtype) if dt in HALF}
    if not halves:
        return torch.float32
    return halves.pop() if len(halves) == 1 else torch.bfloat16


def fp32_dot_precision() -> str:
    """How fp32 products run: "tf32" (tensor cores, 10-bit mantissa operands) when PyTorch's own fp32
    matmuls may use TF32 (`torch.set_float32_matmul_precision("high")` or "medium"), else "ieee"."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def inverse_norms(w: Tensor) -> Tensor:
    """1 / max(‖w_k‖, eps) per row (fp32), F.normalize's convention."""
    return torch.linalg.vector_norm(w.float(), dim=1).clamp_min(NORM_EPS).reciprocal()


def normalize_backward_(dv: Tensor, w: Tensor, inv_norm: Tensor, chunk: int) -> Tensor:
    """In place: turn dL/dv into dL/dw for v = w/‖w‖ (dw = (dv − v (v·dv))/‖w‖), chunk by chunk."""
    for s, e in spans(w.shape[0], chunk):
        v = w[s:e].float() * inv_norm[s:e, None]
        block = dv[s:e]
        block.sub_(v * (v * block).sum(1, keepdim=True)).mul_(inv_norm[s:e, None])
    return dv


def target_vectors(w: Tensor, inv_norm: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(v_{t_i} as fp32 (n, d), mask of rows with a target in this block)."""
    has = targets >= 0
    if w.shape[0] == 0:  # an empty shard (more ranks than classes)
        return w.new_zeros(targets.shape[0], w.shape[1], dtype=torch.float32), has
    idx = targets.clamp_min(0)
    v = w.float()[idx]
    if inv_norm is not None:
        v = v * inv_norm[idx, None]
    return v * has[:, None], has


def check_inputs(x: Tensor, w: Tensor, bias: Tensor | None, targets: Tensor) -> None:
    """Shapes agree: x (n, d), w (c, d), bias (c,), targets (n,) in [-1, c)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"embeddings {tuple(x.shape)} and weights {tuple(w.shape)} must be (n, d) and (c, d)")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({w.shape[0]},)")
    if targets.shape != (x.shape[0],):
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected ({x.shape[0]},)")
    check_range(targets, -1, w.shape[0], "targets")
