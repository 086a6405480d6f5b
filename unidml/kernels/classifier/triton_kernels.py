"""Fused Triton kernels for the classifier scores (see `common`): never writing the n × c logits.

A tile's logits are l = s·(x·wᵀ·inv_norm + b), its dot product accumulated in fp32 over feature
blocks; the target entries (column = t_i) and the padding are masked out.
Forward: `fwd_rows` (one program per block of rows, streaming class tiles: online log-sum-exp) and
`fwd_cols` (one program per block of classes, streaming row tiles), each storing −inf for an empty
reduction. Backward recomputes tiles: G = s·(g_row·e^{l − row_lse} + g_col·e^{l − col_lse}) on the
kept entries, then `bwd_dx` accumulates G·V (row-block × feature-block programs) and `bwd_dv`
accumulates Gᵀ·X and, in its first feature block, the bias gradient Σ_i G (class-block programs).
Every matrix product goes through `_dot`: both operands cast to the one compute dtype `DOT` chosen
by the launcher (bf16 / fp16 on tensor cores, or fp32 with `PRECISION` "ieee" or "tf32"), fp32
accumulation. Offsets into X, W, DX and DV are 64-bit (`_rows64`): row × stride passes 2^31 at about
1.05 M classes of d = 2048.
Tiles are autotuned (`triton.autotune`, keyed on d; one small config under TRITON_INTERPRET=1).
The backward's feature block BLOCK_D is tuned with them: each backward kernel computes a logit tile
once per feature block (twice at d = 512 with BLOCK_D = 256).
"""
import os

import triton
import triton.language as tl


def _configs(kind: str) -> list:
    """Autotuning candidates (one tiny config when interpreted, so small test inputs still span several tiles).

    The backward programs keep a (tile x BLOCK_D) fp32 accumulator and recompute their logit tiles once per
    feature block: BLOCK_D is tuned too (128 or 256; at d = 512 a 512-wide block spills heavily on sm_90,
    ptxas reports several KiB per thread), and a config that does not fit is skipped by the autotuner."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        extra = {"BLOCK_D": 16} if kind != "fwd" else {}
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, **extra}, num_warps=4)]
    shapes = {  # (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, warps, stages)
        "fwd": [(64, 64, 32, 0, 4, 3), (128, 128, 32, 0, 8, 3), (64, 128, 32, 0, 4, 3), (128, 64, 32, 0, 8, 3)],
        "bwd_dx": [(64, 64, 32, 128, 8, 3), (64, 64, 32, 256, 8, 3), (16, 64, 32, 256, 4, 3), (32, 128, 32, 128, 8, 3)],
        "bwd_dv": [(64, 64, 32, 128, 8, 3), (64, 64, 32, 256, 8, 3), (64, 16, 32, 256, 4, 3), (128, 32, 32, 128, 8, 3)],
    }[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": nb, "BLOCK_K": k, **({"BLOCK_D": bd} if bd else {})},
                          num_warps=w, num_stages=st) for m, nb, k, bd, w, st in shapes]


def _tuned(kind: str):
    """Autotuned on d only: the class count changes from step to step under PartialFC sampling, and a new
    key would tune again."""
    return triton.autotune(configs=_configs(kind), key=["d"])



@triton.jit
def _rows64(index, stride):
    """Element offsets index × stride in 64 bits (an int32 product wraps past 2^31)."""
    return index.to(tl.int64) * stride


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a·b with both operands in the compute dtype DOT (the one place operands are cast)."""
    return tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION)


@triton.jit
def _logits(X, W, INV, BIAS, T, rows, cols, n, c, d, sx, sw, scale, NORMALIZE: tl.constexpr,
            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            DOT: tl.constexpr, PRECISION: tl.constexpr):
    """(logits, kept-entry mask) of one tile."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows, w_rows = _rows64(rows, sx), _rows64(cols, sw)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(X + x_rows[:, None] + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < d), other=0.0)
        b = tl.load(W + w_rows[:, None] + ks[None, :], mask=(cols[:, None] < c) & (ks[None, :] < d), other=0.0)
        acc = _dot(a, tl.trans(b), acc, DOT, PRECISION)
    if NORMALIZE:
        acc = acc * tl.load(INV + cols, mask=cols < c, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + cols, mask=cols < c, other=0.0)[None, :]
    t = tl.load(T + rows, mask=rows < n, other=-1)
    keep = (rows[:, None] < n) & (cols[None, :] < c) & (cols[None, :] != t[:, None])
    return acc * scale, keep


@triton.jit
def _lse_update(run_max, run_sum, a, keep, AXIS: tl.constexpr):
    """Online log-sum-exp along AXIS: fold the kept entries of `a` into (running max, scaled sum)."""
    new_max = tl.maximum(run_max, tl.max(tl.where(keep, a, -1.0e30), AXIS))
    if AXIS == 1:
        scaled = tl.exp(tl.where(keep, a - new_max[:, None], -1.0e30))
    else:
        scaled = tl.exp(tl.where(keep, a - new_max[None, :], -1.0e30))
    return new_max, run_sum * tl.exp(run_max - new_max) + tl.sum(scaled, AXIS)


@triton.jit
def _finish(run_max, run_sum):
    """log-sum-exp from (max, sum); −inf where nothing was kept."""
    return tl.where(run_sum > 0, run_max + tl.log(tl.maximum(run_sum, 1e-30)), float("-inf"))


@_tuned("fwd")
@triton.jit
def fwd_rows(X, W, INV, BIAS, T, ROW_LSE, n, c, d, sx, sw, scale, NORMALIZE: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    run_max = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, c, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        logits, keep = _logits(X, W, INV, BIAS, T, rows, cols, n, c, d, sx, sw, scale, NORMALIZE, HAS_BIAS,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT, PRECISION)
        run_max, run_sum = _lse_update(run_max, run_sum, logits, keep, 1)
    tl.store(ROW_LSE + rows, _finish(run_max, run_sum), mask=rows < n)


@_tuned("fwd")
@triton.jit
def fwd_cols(X, W, INV, BIAS, T, COL_LSE, n, c, d, sx, sw, scale, NORMALIZE: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT: tl.constexpr, PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    run_max = tl.zeros([BLOCK_N], dtype=tl.float32) - 1.0e30
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, n, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        logits, keep = _logits(X, W, INV, BIAS, T, rows, cols, n, c, d, sx, sw, scale, NORMALIZE, HAS_BIAS,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT, PRECISION)
        run_max, run_sum = _lse_update(run_max, run_sum, logits, keep, 0)
    tl.store(COL_LSE + cols, _finish(run_max, run_sum), mask=cols < c)


@triton.jit
def _grad_tile(logits, keep, rows, cols, n, c, GROW, ROW_LSE, GCOL, COL_LSE, scale, HAS_ROW: tl.constexpr,
               HAS_COL: tl.constexpr):
    """G = ∂L/∂(x·v) of one tile (the logit gradient times the scale)."""
    g = tl.zeros(logits.shape, dtype=tl.float32)
    if HAS_ROW:
        gr = tl.load(GROW + rows, mask=rows < n, other=0.0)
        lse = tl.load(ROW_LSE + rows, mask=rows < n, other=0.0)
        g += gr[:, None] * tl.exp(tl.where(keep, logits - lse[:, None], -1.0e30))
    if HAS_COL:
        gc = tl.load(GCOL + cols, mask=cols < c, other=0.0)
        lse_c = tl.load(COL_LSE + cols, mask=cols < c, other=0.0)
        g += gc[None, :] * tl.exp(tl.where(keep, logits - lse_c[None, :], -1.0e30))
    return g * scale


@_tuned("bwd_dx")
@triton.jit
def bwd_dx(X, W, INV, BIAS, T, GROW, ROW_LSE, GCOL, COL_LSE, DX, n, c, d, sx, sw, scale,
           NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
           DOT: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, c, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        logits, keep = _logits(X, W, INV, BIAS, T, rows, cols, n, c, d, sx, sw, scale, NORMALIZE, HAS_BIAS,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT, PRECISION)
        g = _grad_tile(logits, keep, rows, cols, n, c, GROW, ROW_LSE, GCOL, COL_LSE, scale, HAS_ROW, HAS_COL)
        if NORMALIZE:
            g = g * tl.load(INV + cols, mask=cols < c, other=0.0)[None, :]
        v = tl.load(W + _rows64(cols, sw)[:, None] + feats[None, :],
                    mask=(cols[:, None] < c) & (feats[None, :] < d), other=0.0)
        acc = _dot(g, v, acc, DOT, PRECISION)
    tl.store(DX + _rows64(rows, d)[:, None] + feats[None, :], acc, mask=(rows[:, None] < n) & (feats[None, :] < d))


@_tuned("bwd_dv")
@triton.jit
def bwd_dv(X, W, INV, BIAS, T, GROW, ROW_LSE, GCOL, COL_LSE, DV, DB, n, c, d, sx, sw, scale,
           NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
           DOT: tl.constexpr, PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feats = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, n, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        logits, keep = _logits(X, W, INV, BIAS, T, rows, cols, n, c, d, sx, sw, scale, NORMALIZE, HAS_BIAS,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT, PRECISION)
        g = _grad_tile(logits, keep, rows, cols, n, c, GROW, ROW_LSE, GCOL, COL_LSE, scale, HAS_ROW, HAS_COL)
        bias_acc += tl.sum(g, 0)
        xt = tl.load(X + _rows64(rows, sx)[:, None] + feats[None, :],
                     mask=(rows[:, None] < n) & (feats[None, :] < d), other=0.0)
        acc = _dot(tl.trans(g), xt, acc, DOT, PRECISION)
    tl.store(DV + _rows64(cols, d)[:, None] + feats[None, :], acc, mask=(cols[:, None] < c) & (feats[None, :] < d))
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.store(DB + cols, bias_acc, mask=cols < c)
