"""Fused Triton kernels for the pairwise row programs (FlashAttention-style, never writing n x m).

Forward (`rows_fwd`): one program per block of anchor rows streams reference tiles through SRAM,
computes the tile's dot products with fp32 accumulation (bf16/fp16/fp32 inputs), turns them into
pair values and masks, and keeps only per-row statistics: online log-sum-exp (running max + scaled
sum), running hardest positive / negative with their column, sums and counts. Multi-similarity takes
two passes (mining thresholds, then the masked log-sum-exps).
Backward (`rows_bwd_dx`, `rows_bwd_dr`): recompute each tile, form dL/dV from the saved row
statistics, and accumulate dX = G·R (row-block programs) and dR = Gᵀ·X (column-block programs),
each over a block of feature columns.
X and R arrive in one dtype (`dispatch.operand_dtype`): half-precision tiles go to tl.dot as they
are (tensor cores, fp32 accumulation), fp32 ones in IEEE fp32.

Loss ids, reduction ids and the parameters P0..P3 of each loss are those of `fused` (shared with
the row programs). Pair values follow the duplicate rule of `geometry` with coefficient TOL.
Row statistics S0..S3 saved for backward: MS (lse_pos, lse_neg, hardest neg, easiest pos),
SNCA/SupCon (lse_all, lse_pos, #positives, -), batch-hard (active, -, -, -) plus its two columns.
"""
import os

import triton
import triton.language as tl

from unidml.kernels.pairwise.fused import LossId, ReductionId

CONTRASTIVE = tl.constexpr(int(LossId.CONTRASTIVE))
MULTI_SIMILARITY = tl.constexpr(int(LossId.MULTI_SIMILARITY))
SNCA = tl.constexpr(int(LossId.SNCA))
SUPCON = tl.constexpr(int(LossId.SUPCON))
MEAN_NONZERO = tl.constexpr(int(ReductionId.MEAN_NONZERO))
PER_ANCHOR = tl.constexpr(int(ReductionId.PER_ANCHOR))


def _configs(shapes: tuple[tuple[int, int, int, int, int], ...]) -> list[triton.Config]:
    """Autotuning candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); one small config under the
    interpreter, so tiny test inputs still span several tiles and nothing is benchmarked."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in shapes]


# Forward: (BLOCK_M x BLOCK_N) fp32 tiles with a BLOCK_K-deep operand pipeline (H100-sized candidates).
FWD_CONFIGS = _configs(((64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3),
                        (128, 128, 32, 8, 3), (128, 64, 64, 8, 4)))
# Backward: each program also holds a (BLOCK x BLOCK_D) fp32 gradient block, BLOCK_D up to 512.
BWD_CONFIGS = _configs(((32, 32, 64, 4, 3), (32, 64, 32, 4, 3), (64, 32, 32, 8, 3), (64, 64, 32, 8, 3),
                        (32, 64, 64, 8, 4), (64, 64, 64, 8, 3)))
TUNE_KEY = ["n", "m", "d", "LOSS", "EUCLID"]


@triton.jit
def element_offsets(idx, feats, stride):
    """Offsets idx_i·stride + f of a (rows x features) block, in int64: with int32 indices the product
    wraps past 2^31 elements (e.g. 4.2 M references at d = 512)."""
    return idx[:, None].to(tl.int64) * stride + feats[None, :]


@triton.jit
def load_block(E, idx, feats, count, d, stride):
    """Rows `idx` x columns `feats` of an embedding matrix E (count x d, row stride `stride`), 0 outside."""
    return tl.load(E + element_offsets(idx, feats, stride), mask=(idx[:, None] < count) & (feats[None, :] < d),
                   other=0.0)


@triton.jit
def _dot_tile(X, R, rows, cols, n, m, d, sx, sr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = load_block(X, rows, ks, n, d, sx)
        b = load_block(R, cols, ks, m, d, sr)
        acc += tl.dot(a, tl.trans(b), input_precision="ieee")
    return acc


@triton.jit
def pair_tile(X, R, XSQ, RSQ, Y, RY, rows, cols, n, m, d, sx, sr, self_offset, TOL, EUCLID: tl.constexpr,
          HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pair values V (cosine or distance, duplicates snapped) and positive / negative masks of one tile."""
    dots = _dot_tile(X, R, rows, cols, n, m, d, sx, sr, BLOCK_M, BLOCK_N, BLOCK_K)
    yi = tl.load(Y + rows, mask=rows < n, other=0)
    yj = tl.load(RY + cols, mask=cols < m, other=0)
    inside = (rows[:, None] < n) & (cols[None, :] < m)
    same = yi[:, None] == yj[None, :]
    pos = same & inside
    if HAS_SELF:
        pos = pos & (cols[None, :] != rows[:, None] + self_offset)
    neg = (yi[:, None] != yj[None, :]) & inside
    if EUCLID:
        xs = tl.load(XSQ + rows, mask=rows < n, other=0.0)[:, None]
        rs = tl.load(RSQ + cols, mask=cols < m, other=0.0)[None, :]
    else:
        xs, rs = dots, dots  # unused: cosine values ignore the norms
    return pair_values(dots, xs, rs, TOL, EUCLID), pos, neg


@triton.jit
def pair_values(dots, xs, rs, TOL, EUCLID: tl.constexpr):
    """V from dot products and squared norms (broadcast to `dots`), with the duplicate rule."""
    if EUCLID:
        norms = xs + rs
        d2 = norms - 2.0 * dots
        return tl.where(d2 > TOL * norms, tl.sqrt(tl.maximum(d2, 0.0)), 0.0)
    return tl.where(dots >= 1.0 - TOL, 1.0, dots)


@triton.jit
def _lse_update(run_max, run_sum, a, keep):
    """Online log-sum-exp: fold the kept entries of tile `a` into (running max, scaled sum)."""
    new_max = tl.maximum(run_max, tl.max(tl.where(keep, a, -1.0e30), 1))
    scaled = tl.exp(tl.where(keep, a - new_max[:, None], -1.0e30))
    return new_max, run_sum * tl.exp(run_max - new_max) + tl.sum(scaled, 1)


@triton.jit
def _grad_tile(v, pos, neg, cols, gt, gc, s0, s1, s2, s3, j0, j1, P0, P1, P2, P3,
               LOSS: tl.constexpr, POWER: tl.constexpr):
    """dL/dV of one tile from the row statistics and the upstream gradients (gt, gc) of the row sums."""
    if LOSS == CONTRASTIVE:
        u = v * P2
        over = tl.where(pos & (u - P0 > 0), 1.0, 0.0)
        under = tl.where(neg & (P1 - u > 0), 1.0, 0.0)
        if POWER == 2:
            over = over * 2.0 * (u - P0)
            under = under * 2.0 * (P1 - u)
        g = (gt[:, None] * over - gc[:, None] * under) * P2
    elif LOSS == MULTI_SIMILARITY:
        keep_p = pos & (v - P3 < s2[:, None])
        keep_n = neg & (v + P3 > s3[:, None])
        wp = tl.exp(tl.where(keep_p, -P0 * (v - P2) - s0[:, None], -1.0e30))
        wn = tl.exp(tl.where(keep_n, P1 * (v - P2) - s1[:, None], -1.0e30))
        g = gc[:, None] * wn - gt[:, None] * wp
    elif LOSS == SNCA or LOSS == SUPCON:
        a = v / P0
        g = gc[:, None] * tl.exp(tl.where(pos | neg, a - s0[:, None], -1.0e30)) / P0
        if LOSS == SNCA:
            g -= gt[:, None] * tl.exp(tl.where(pos, a - s1[:, None], -1.0e30)) / P0
        else:
            g -= tl.where(pos, gt[:, None] / (tl.maximum(s2, 1.0)[:, None] * P0), 0.0)
        g = tl.where((s2 > 0)[:, None], g, 0.0)
    else:  # batch-hard triplet
        hit_p = tl.where(cols[None, :] == j0[:, None], gt[:, None], 0.0)
        hit_n = tl.where(cols[None, :] == j1[:, None], gc[:, None], 0.0)
        g = tl.where((s0 > 0)[:, None], (hit_p - hit_n) * P2, 0.0)
    return g


@triton.autotune(configs=FWD_CONFIGS, key=TUNE_KEY)
@triton.jit
def rows_fwd(X, R, XSQ, RSQ, Y, RY, SUMS, COUNTS, STATS, IDX, n, m, d, sx, sr, self_offset, TOL,
             P0, P1, P2, P3, LOSS: tl.constexpr, POWER: tl.constexpr, REDUCTION: tl.constexpr,
             EUCLID: tl.constexpr, HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_t, acc_c, cnt_t, cnt_c = zero, zero, zero, zero
    max_a, sum_a, max_b, sum_b = zero - 1.0e30, zero, zero - 1.0e30, zero
    best_a, best_b = zero - 1.0e30, zero + 1.0e30
    idx_a = tl.zeros([BLOCK_M], dtype=tl.int32)
    idx_b = tl.zeros([BLOCK_M], dtype=tl.int32)
    if LOSS == MULTI_SIMILARITY:  # pass 1: hardest negative and easiest positive similarity per anchor
        for c0 in range(0, m, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            v, pos, neg = pair_tile(X, R, XSQ, RSQ, Y, RY, rows, cols, n, m, d, sx, sr, self_offset, TOL,
                                EUCLID, HAS_SELF, BLOCK_M, BLOCK_N, BLOCK_K)
            best_a = tl.maximum(best_a, tl.max(tl.where(neg, v, -1.0e30), 1))
            best_b = tl.minimum(best_b, tl.min(tl.where(pos, v, 1.0e30), 1))
        max_a, sum_a, max_b, sum_b = zero, zero + 1.0, zero, zero + 1.0  # the "1 +" term
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        v, pos, neg = pair_tile(X, R, XSQ, RSQ, Y, RY, rows, cols, n, m, d, sx, sr, self_offset, TOL,
                            EUCLID, HAS_SELF, BLOCK_M, BLOCK_N, BLOCK_K)
        if LOSS == CONTRASTIVE:
            u = v * P2
            over = tl.where(pos, tl.maximum(u - P0, 0.0), 0.0)
            under = tl.where(neg, tl.maximum(P1 - u, 0.0), 0.0)
            if POWER == 2:
                over = over * over
                under = under * under
            acc_t += tl.sum(over, 1)
            acc_c += tl.sum(under, 1)
            if REDUCTION == MEAN_NONZERO:
                cnt_t += tl.sum(tl.where(over > 0, 1.0, 0.0), 1)
                cnt_c += tl.sum(tl.where(under > 0, 1.0, 0.0), 1)
            else:
                cnt_t += tl.sum(tl.where(pos, 1.0, 0.0), 1)
                cnt_c += tl.sum(tl.where(neg, 1.0, 0.0), 1)
        elif LOSS == MULTI_SIMILARITY:
            keep_p = pos & (v - P3 < best_a[:, None])
            keep_n = neg & (v + P3 > best_b[:, None])
            max_a, sum_a = _lse_update(max_a, sum_a, -P0 * (v - P2), keep_p)
            max_b, sum_b = _lse_update(max_b, sum_b, P1 * (v - P2), keep_n)
        elif LOSS == SNCA or LOSS == SUPCON:
            a = v / P0
            max_a, sum_a = _lse_update(max_a, sum_a, a, pos | neg)
            if LOSS == SNCA:
                max_b, sum_b = _lse_update(max_b, sum_b, a, pos)
            else:
                acc_t += tl.sum(tl.where(pos, a, 0.0), 1)
            cnt_t += tl.sum(tl.where(pos, 1.0, 0.0), 1)
        else:  # batch-hard triplet: hardest positive / negative and their columns
            u = v * P2
            up = tl.where(pos, u, -1.0e30)
            tile_max = tl.max(up, 1)
            better = tile_max > best_a
            idx_a = tl.where(better, c0 + tl.argmax(up, 1), idx_a)
            best_a = tl.where(better, tile_max, best_a)
            un = tl.where(neg, u, 1.0e30)
            tile_min = tl.min(un, 1)
            better = tile_min < best_b
            idx_b = tl.where(better, c0 + tl.argmin(un, 1), idx_b)
            best_b = tl.where(better, tile_min, best_b)
            cnt_t += tl.sum(tl.where(pos, 1.0, 0.0), 1)
            cnt_c += tl.sum(tl.where(neg, 1.0, 0.0), 1)
    s0, s1, s2, s3 = zero, zero, zero, zero
    if LOSS == CONTRASTIVE:
        if REDUCTION == PER_ANCHOR:
            cnt_t, cnt_c = zero + 1.0, zero + 1.0
    elif LOSS == MULTI_SIMILARITY:
        s0 = max_a + tl.log(sum_a)
        s1 = max_b + tl.log(sum_b)
        s2, s3 = best_a, best_b
        acc_t, acc_c, cnt_t, cnt_c = s0 / P0, s1 / P1, zero + 1.0, zero + 1.0
    elif LOSS == SNCA or LOSS == SUPCON:
        valid = cnt_t > 0
        s0 = tl.where(sum_a > 0, max_a + tl.log(tl.maximum(sum_a, 1e-30)), 0.0)
        s1 = tl.where(valid, max_b + tl.log(tl.maximum(sum_b, 1e-30)), 0.0)
        s2 = cnt_t
        if LOSS == SNCA:
            acc_t = tl.where(valid, -s1, 0.0)
        else:
            acc_t = tl.where(valid, -acc_t / tl.maximum(cnt_t, 1.0), 0.0)
        acc_c = tl.where(valid, s0, 0.0)
        cnt_t = tl.where(valid, 1.0, 0.0)
        cnt_c = cnt_t
    else:  # batch-hard triplet
        valid = (cnt_t > 0) & (cnt_c > 0)
        hard_p = tl.where(valid, best_a, 0.0)
        hard_n = tl.where(valid, best_b, 0.0)
        active = valid & (hard_p - hard_n + P0 > 0)
        s0 = tl.where(active, 1.0, 0.0)
        acc_t = tl.where(active, hard_p, 0.0)
        acc_c = tl.where(active, P0 - hard_n, 0.0)
        cnt_t, cnt_c = s0, s0
    keep = rows < n
    tl.store(SUMS + rows * 2, acc_t, mask=keep)
    tl.store(SUMS + rows * 2 + 1, acc_c, mask=keep)
    tl.store(COUNTS + rows * 2, cnt_t, mask=keep)
    tl.store(COUNTS + rows * 2 + 1, cnt_c, mask=keep)
    tl.store(STATS + rows * 4, s0, mask=keep)
    tl.store(STATS + rows * 4 + 1, s1, mask=keep)
    tl.store(STATS + rows * 4 + 2, s2, mask=keep)
    tl.store(STATS + rows * 4 + 3, s3, mask=keep)
    tl.store(IDX + rows * 2, idx_a, mask=keep)
    tl.store(IDX + rows * 2 + 1, idx_b, mask=keep)


@triton.jit
def _row_state(GS, STATS, IDX, rows, n):
    keep = rows < n
    gt = tl.load(GS + rows * 2, mask=keep, other=0.0)
    gc = tl.load(GS + rows * 2 + 1, mask=keep, other=0.0)
    s0 = tl.load(STATS + rows * 4, mask=keep, other=0.0)
    s1 = tl.load(STATS + rows * 4 + 1, mask=keep, other=0.0)
    s2 = tl.load(STATS + rows * 4 + 2, mask=keep, other=0.0)
    s3 = tl.load(STATS + rows * 4 + 3, mask=keep, other=0.0)
    j0 = tl.load(IDX + rows * 2, mask=keep, other=-1)
    j1 = tl.load(IDX + rows * 2 + 1, mask=keep, other=-1)
    return gt, gc, s0, s1, s2, s3, j0, j1


@triton.jit
def _grad_block(X, R, XSQ, RSQ, Y, RY, rows, cols, feats, gt, gc, s0, s1, s2, s3, j0, j1, n, m, d, sx, sr,
                self_offset, TOL, P0, P1, P2, P3, LOSS: tl.constexpr, POWER: tl.constexpr, EUCLID: tl.constexpr,
                HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                FOR_REFS: tl.constexpr):
    """One recomputed tile's share of dX (`FOR_REFS` false: W·R) or of dR (`FOR_REFS`: Wᵀ·X) over the
    feature block `feats`, and H for the norm term.

    With G = dL/dV: cosine W = G; distances dD_ij/dx_i = (x_i - r_j)/D_ij, so H = G/D (0 where D = 0),
    W = -H, and the caller adds x_i Σ_j H_ij (dX) or r_j Σ_i H_ij (dR).
    """
    v, pos, neg = pair_tile(X, R, XSQ, RSQ, Y, RY, rows, cols, n, m, d, sx, sr, self_offset, TOL,
                        EUCLID, HAS_SELF, BLOCK_M, BLOCK_N, BLOCK_K)
    g = _grad_tile(v, pos, neg, cols, gt, gc, s0, s1, s2, s3, j0, j1, P0, P1, P2, P3, LOSS, POWER)
    if FOR_REFS:
        return weighted_dot(g, v, X, rows, feats, n, d, sx, EUCLID, True)
    return weighted_dot(g, v, R, cols, feats, m, d, sr, EUCLID, False)


@triton.jit
def weighted_dot(g, v, E, idx, feats, count, d, stride, EUCLID: tl.constexpr, FOR_REFS: tl.constexpr):
    """(W·E[idx, feats] or Wᵀ·E[idx, feats] with `FOR_REFS`, H) for a tile's G = dL/dV and values V:
    cosine W = H = G; distances H = G/D (0 where D = 0), W = -H (the caller adds the e·Σ H term)."""
    h = g
    w = g
    if EUCLID:
        h = tl.where(v > 0, g / tl.where(v > 0, v, 1.0), 0.0)
        w = -h
    other = load_block(E, idx, feats, count, d, stride)
    if FOR_REFS:
        w = tl.trans(w)
    return tl.dot(w.to(other.dtype), other, input_precision="ieee"), h


@triton.jit
def grad_program(BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """A backward program's (embedding rows, feature columns, zero gradient block, zero Σ H)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    feats = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return idx, feats, tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK], dtype=tl.float32)


@triton.jit
def store_grad(OUT, E, idx, feats, count, d, stride, acc, h_sum, EUCLID: tl.constexpr):
    """Write acc (+ e_i Σ H_i for distances) to rows `idx` of OUT (count x d, contiguous)."""
    if EUCLID:
        acc += load_block(E, idx, feats, count, d, stride).to(tl.float32) * h_sum[:, None]
    tl.store(OUT + element_offsets(idx, feats, d), acc, mask=(idx[:, None] < count) & (feats[None, :] < d))


@triton.autotune(configs=BWD_CONFIGS, key=TUNE_KEY)
@triton.jit
def rows_bwd_dx(X, R, XSQ, RSQ, Y, RY, GS, STATS, IDX, DX, n, m, d, sx, sr, self_offset, TOL,
                P0, P1, P2, P3, LOSS: tl.constexpr, POWER: tl.constexpr, EUCLID: tl.constexpr,
                HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, feats, acc, h_sum = grad_program(BLOCK_M, BLOCK_D)
    gt, gc, s0, s1, s2, s3, j0, j1 = _row_state(GS, STATS, IDX, rows, n)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        part, h = _grad_block(X, R, XSQ, RSQ, Y, RY, rows, cols, feats, gt, gc, s0, s1, s2, s3, j0, j1, n, m, d,
                              sx, sr, self_offset, TOL, P0, P1, P2, P3, LOSS, POWER, EUCLID, HAS_SELF,
                              BLOCK_M, BLOCK_N, BLOCK_K, False)
        acc += part
        if EUCLID:
            h_sum += tl.sum(h, 1)
    store_grad(DX, X, rows, feats, n, d, sx, acc, h_sum, EUCLID)


@triton.autotune(configs=BWD_CONFIGS, key=TUNE_KEY)
@triton.jit
def rows_bwd_dr(X, R, XSQ, RSQ, Y, RY, GS, STATS, IDX, DR, n, m, d, sx, sr, self_offset, TOL,
                P0, P1, P2, P3, LOSS: tl.constexpr, POWER: tl.constexpr, EUCLID: tl.constexpr,
                HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    cols, feats, acc, h_sum = grad_program(BLOCK_N, BLOCK_D)
    for r0 in range(0, n, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        gt, gc, s0, s1, s2, s3, j0, j1 = _row_state(GS, STATS, IDX, rows, n)
        part, h = _grad_block(X, R, XSQ, RSQ, Y, RY, rows, cols, feats, gt, gc, s0, s1, s2, s3, j0, j1, n, m, d,
                              sx, sr, self_offset, TOL, P0, P1, P2, P3, LOSS, POWER, EUCLID, HAS_SELF,
                              BLOCK_M, BLOCK_N, BLOCK_K, True)
        acc += part
        if EUCLID:
            h_sum += tl.sum(h, 0)
    store_grad(DR, R, cols, feats, m, d, sr, acc, h_sum, EUCLID)
