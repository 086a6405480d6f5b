"""Tiled backend: class chunks of the logit matrix, O((n + c)·d + n·chunk) memory, recomputing backward.

Forward streams class chunks: each chunk's logits are one `addmm` (in base 2: exp2 is the cheap
exponential on CPU), the target entries are set to −inf through the sorted target index, the row
log-sum-exp is folded in online (running max and rescaled sum, in place on the chunk) and the column
log-sum-exp of the chunk is complete at once (a chunk holds every row). Backward recomputes each chunk,
forms G = ∂L/∂l from the saved row / column log-sum-exps and the upstream gradients, and accumulates
dX += s·G·V and writes dV_chunk = s·Gᵀ·X,
dbias_chunk = s·Σ_i G; the target and Σ_k v_k terms are added to dV, then the normalisation chain
is applied chunk by chunk, so dW is the only (c, d) tensor backward allocates.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from unidml.kernels.classifier.common import (
    ClassScores,
    inverse_norms,
    normalize_backward_,
    spans,
    target_vectors,
)

CHUNK_ELEMENTS = 1 << 23  # 32 MiB of fp32 logits per chunk: matmuls large enough to run at full speed
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def default_chunk_classes(n: int) -> int:
    """Classes per chunk so an n x chunk logit block holds about CHUNK_ELEMENTS values."""
    return max(16, CHUNK_ELEMENTS // max(n, 1))


def _augmented(x: Tensor, bias: Tensor | None) -> Tensor:
    """x with a column of ones when there is a bias, so one matmul gives x·v + b (and Gᵀ·[x, 1] gives dbias)."""
    return x if bias is None else torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def _chunk_logits(xa: Tensor, w: Tensor, bias: Tensor | None, inv_norm: Tensor | None, scale: float,
                  targets: Tensor, s: int, e: int) -> tuple[Tensor, Tensor]:
    """(base-2 logits log2(e)·l of classes [s, e), target entries at −inf; the chunk's v rows in fp32).

    Base 2 because exp2 is markedly cheaper than exp on CPU; the log-sum-exps are converted back.
    The scale and the bias ride on the (chunk, d) weights, so the n x chunk block is written once.
    """
    v = w[s:e].float()
    if inv_norm is not None:
        v = v * inv_norm[s:e, None]
    factor = scale * LOG2E
    va = v * factor if bias is None else torch.cat([v, bias[s:e].float()[:, None]], dim=1).mul_(factor)
    logits = torch.mm(xa, va.T)
    _mask_targets_(logits, targets, s, e)
    return logits, v


def _mask_targets_(logits: Tensor, targets: Tensor, s: int, e: int) -> None:
    """In place: −inf at each row's target entry when its target lies in classes [s, e).

    One gather and one scatter of n values (rows whose target is elsewhere write their own value
    back), so no index set of data-dependent size is ever built (no host sync)."""
    column = (targets - s).clamp(0, e - s - 1)[:, None]
    inside = ((targets >= s) & (targets < e))[:, None]
    logits.scatter_(1, column, torch.where(inside, float("-inf"), logits.gather(1, column)))


def _finite_or_zero(t: Tensor) -> Tensor:
    """−inf (no entry) -> 0, so exp2(l − lse) of its (all −inf) entries is 0 rather than NaN."""
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _exp2_shifted_(logits: Tensor, shift: Tensor, dim: int) -> Tensor:
    """In place: 2^(logits − shift) with `shift` broadcast along `dim` (rows for dim=1, columns for 0)."""
    return logits.sub_(shift[:, None] if dim == 1 else shift[None, :]).exp2_()


def _grad_shift(lse: Tensor, grad: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(base-2 shift, sign) with G = sign · 2^(l2 − shift) = s·g·e^{l − lse}.

    The magnitude log2|s·g| folds into the exponent, sparing a pass over the chunk; the sign (±1, 0)
    is applied to the (n, d) or (c, d) operands of the matmuls when only one side has a gradient
    (see `TiledClassScores.backward`), so no branch depends on the gradient's values (no host sync).
    """
    g = grad.float() * scale
    return _finite_or_zero(lse * LOG2E) - torch.log2(g.abs()), torch.sign(g)


def _scaled_exp2_(logits: Tensor, shift: tuple[Tensor, Tensor], dim: int, s: int, e: int, signed: bool) -> Tensor:
    """In place: the chunk's |gradient| part for the row (dim=1) or column (dim=0) log-sum-exps,
    times its sign when `signed`."""
    base, sign = shift
    out = _exp2_shifted_(logits, base[s:e], dim)
    if signed:
        out.mul_(sign[s:e, None] if dim == 1 else sign[None, s:e])
    return out


class TiledClassScores(torch.autograd.Function):
    """(x, w, bias) -> ClassScores, class chunk by class chunk."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, targets: Tensor, scale: float, normalize: bool,
                rows: bool, columns: bool, chunk: int):
        x32 = x.float()
        xa = _augmented(x32, bias)
        n, c = x.shape[0], w.shape[0]
        inv_norm = inverse_norms(w) if normalize else None
        run_max = torch.full((n,), float("-inf"), device=x.device)  # base 2, online over chunks
        run_sum = torch.zeros(n, device=x.device)
        col_lse = torch.empty(c if columns else 0, device=x.device)
        weight_sum = torch.zeros(x.shape[1], device=x.device)
        for s, e in spans(c, chunk):
            logits, v = _chunk_logits(xa, w, bias, inv_norm, scale, targets, s, e)
            if columns:  # a chunk holds every row: its column log-sum-exps are complete
                top = _finite_or_zero(logits.amax(0))
                block = logits.clone() if rows else logits  # the row pass below still needs the logits
                col_lse[s:e] = (top + _exp2_shifted_(block, top, 0).sum(0).log2_()) * LN2
            weight_sum += v.sum(0)
            if not rows:
                continue
            new_max = torch.maximum(run_max, logits.amax(1))
            safe = _finite_or_zero(new_max)
            run_sum = run_sum * torch.exp2(run_max - safe) + _exp2_shifted_(logits, safe, 1).sum(1)
            run_max = new_max
        # log2(0) = −inf: a row without any other class
        row_lse = (_finite_or_zero(run_max) + run_sum.log2()) * LN2 if rows else x32.new_empty(0)
        v_t, has = target_vectors(w, inv_norm, targets)
        target = (x32 * v_t).sum(1)
        ctx.save_for_backward(x, w, bias, targets, row_lse, col_lse)
        ctx.scale, ctx.normalize, ctx.rows, ctx.columns, ctx.chunk = scale, normalize, rows, columns, chunk
        ctx.set_materialize_grads(False)
        return row_lse, target, col_lse, weight_sum

    @staticmethod
    def backward(ctx, g_row: Tensor | None, g_target: Tensor | None, g_col: Tensor | None,
                 g_wsum: Tensor | None):
        x, w, bias, targets, row_lse, col_lse = ctx.saved_tensors
        x32 = x.float()
        xa = _augmented(x32, bias)
        scale = ctx.scale
        inv_norm = inverse_norms(w) if ctx.normalize else None
        d = x.shape[1]
        dx = torch.zeros_like(x32)
        dv = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        db = None if bias is None else torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
        rows_live = g_row is not None and ctx.rows
        cols_live = g_col is not None and ctx.columns
        if rows_live or cols_live:
            row_shift = _grad_shift(row_lse, g_row, scale) if rows_live else None
            col_shift = _grad_shift(col_lse, g_col, scale) if cols_live else None
            both = rows_live and cols_live  # (tests only) signs applied to the chunk itself
            # One side only: G = diag(sign_r)·E (rows) or E·diag(sign_c) (columns), so the sign goes on
            # X (rows: dV = Eᵀ·(sign_r·X), dX = sign_r·Σ E·V at the end) or on V (columns: dX += E·(sign_c·V),
            # dV = sign_c·(Eᵀ·X)).
            xs = xa * row_shift[1][:, None] if rows_live and not both else xa
            for s, e in spans(w.shape[0], ctx.chunk):
                logits, v = _chunk_logits(xa, w, bias, inv_norm, scale, targets, s, e)
                grad = None
                if cols_live:
                    grad = _scaled_exp2_(logits.clone() if rows_live else logits, col_shift, 0, s, e, both)
                if rows_live:
                    row_part = _scaled_exp2_(logits, row_shift, 1, 0, x.shape[0], both)
                    grad = row_part if grad is None else grad.add_(row_part)
                col_sign = col_shift[1][s:e, None] if cols_live and not both else None
                dx.addmm_(grad, v if col_sign is None else v * col_sign)
                if db is None:
                    chunk_grad = torch.mm(grad.T, xs, out=dv[s:e])
                else:  # [dv | dbias] in one matmul against [x, 1]
                    chunk_grad = torch.mm(grad.T, xs)
                if col_sign is not None:
                    chunk_grad.mul_(col_sign)
                if db is not None:
                    dv[s:e], db[s:e] = chunk_grad[:, :d], chunk_grad[:, d]
            if rows_live and not both:
                dx.mul_(row_shift[1][:, None])
        if g_target is not None:
            v_t, has = target_vectors(w, inv_norm, targets)
            gt = g_target.float() * has  # rows without a target in this block add 0 to class 0
            dx.addcmul_(v_t, gt[:, None])
            dv.index_add_(0, targets.clamp_min(0), x32 * gt[:, None])
        if g_wsum is not None:
            dv += g_wsum.float()[None, :]
        if ctx.normalize:
            normalize_backward_(dv, w, inv_norm, ctx.chunk)
        return (dx.to(x.dtype), dv.to(w.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None, None)


def tiled_scores(x: Tensor, w: Tensor, bias: Tensor | None, targets: Tensor, scale: float, normalize: bool,
                 rows: bool, columns: bool, chunk: int | None = None) -> ClassScores:
    """ClassScores of (x, w, bias) in class chunks with a recomputing backward."""
    out = TiledClassScores.apply(x, w, bias, targets.long(), float(scale), normalize, rows, columns,
                                 chunk or default_chunk_classes(x.shape[0]))
    return ClassScores(*out)
