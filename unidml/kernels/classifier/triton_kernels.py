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
"""
import triton
import triton.language as tl


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
