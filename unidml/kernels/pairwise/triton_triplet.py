"""Fused Triton kernels for the triplet loss over all (`all`) or semi-hard triplets, never writing n x m.

For anchor i with positives P_i and negatives N_i (u = sign·V the dissimilarity, g_pn = u_n - u_p),
a triplet (p, n) is active when g_pn < margin (`all`) or 0 < g_pn < margin (`semi_hard`). With
c_p = #{n: (p, n) active} and c_n = #{p: (p, n) active}, the row sums are

    T_i = Σ_p c_p·u_p,   C_i = Σ_n c_n·(margin - u_n),   count_i = Σ_n c_n,

and, the counts being piecewise constant, dT_i/du_p = c_p and dC_i/du_n = -c_n.

The positives of anchor i are its label's segment [LO_i, HI_i) of the reference columns sorted by
label (ORDER), taken KP at a time ("slots"). Their values come from gathered dot products (the
slot's reference rows), the negatives' from the streamed tiles, and a (rows x KP x columns) compare
gives both counts. Forward and the dX kernel stream every tile once per slot group (one group
when every anchor has at most KP positives); the dR kernel computes each tile once and gathers the
row block's slots for it. The positives' share of dR is scattered by the dX kernel with atomic adds
into DRP (and RSCALE, the distances' r_j·Σ H term); the caller adds them to dR.
"""
import triton
import triton.language as tl

from unidml.kernels.pairwise.triton_kernels import (
    grad_program,
    load_block,
    pair_tile,
    pair_values,
    store_grad,
    weighted_dot,
)


@triton.jit
def _slot_count(LO, HI, rows, n):
    """The most positive-segment entries of any row of the block (the slot loop's bound)."""
    keep = rows < n
    length = tl.load(HI + rows, mask=keep, other=0) - tl.load(LO + rows, mask=keep, other=0)
    return tl.max(length, 0)


@triton.jit
def _slots(ORDER, LO, HI, rows, k0, n, self_offset, HAS_SELF: tl.constexpr, KP: tl.constexpr):
    """Reference columns of slots k0..k0+KP of each row's positives, and which are real positives."""
    keep = rows < n
    lo = tl.load(LO + rows, mask=keep, other=0)
    length = tl.load(HI + rows, mask=keep, other=0) - lo
    ks = k0 + tl.arange(0, KP)
    ok = (ks[None, :] < length[:, None]) & keep[:, None]
    cols = tl.load(ORDER + lo[:, None] + ks[None, :], mask=ok, other=0)
    if HAS_SELF:
        ok = ok & (cols != rows[:, None] + self_offset)
    return cols, ok


@triton.jit
def _slot_values(X, R, XSQ, RSQ, rows, cols, ok, n, d, sx, sr, TOL, EUCLID: tl.constexpr,
                 BLOCK_M: tl.constexpr, KP: tl.constexpr, BLOCK_K: tl.constexpr):
    """V of (row, slot column) pairs from gathered reference rows, fp32 products (exact for halves)."""
    acc = tl.zeros([BLOCK_M, KP], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = load_block(X, rows, ks, n, d, sx).to(tl.float32)
        b = tl.load(R + cols[:, :, None].to(tl.int64) * sr + ks[None, None, :],
                    mask=ok[:, :, None] & (ks[None, None, :] < d), other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None, :] * b, 2)
    if EUCLID:
        xs = tl.load(XSQ + rows, mask=rows < n, other=0.0)[:, None]
        rs = tl.load(RSQ + cols, mask=ok, other=0.0)
    else:
        xs, rs = acc, acc
    return pair_values(acc, xs, rs, TOL, EUCLID)


@triton.jit
def _active(up, ok, un, neg, MARGIN, SEMI_HARD: tl.constexpr):
    """1.0 where (slot p, column n) is an active triplet of the row, as (rows, KP, columns)."""
    gap = un[:, None, :] - up[:, :, None]
    act = ok[:, :, None] & neg[:, None, :] & (gap < MARGIN)
    if SEMI_HARD:
        act = act & (gap > 0)
    return tl.where(act, 1.0, 0.0)


@triton.jit
def triplet_fwd(X, R, XSQ, RSQ, Y, RY, ORDER, LO, HI, SUMS, COUNTS, n, m, d, sx, sr, self_offset, TOL,
                MARGIN, SIGN, EUCLID: tl.constexpr, HAS_SELF: tl.constexpr, SEMI_HARD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, _slot_count(LO, HI, rows, n), KP):
        pcols, ok = _slots(ORDER, LO, HI, rows, k0, n, self_offset, HAS_SELF, KP)
        up = SIGN * _slot_values(X, R, XSQ, RSQ, rows, pcols, ok, n, d, sx, sr, TOL, EUCLID, BLOCK_M, KP, BLOCK_K)
        per_pos = tl.zeros([BLOCK_M, KP], dtype=tl.float32)
        for c0 in range(0, m, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            v, pos, neg = pair_tile(X, R, XSQ, RSQ, Y, RY, rows, cols, n, m, d, sx, sr, self_offset, TOL,
                                    EUCLID, HAS_SELF, BLOCK_M, BLOCK_N, BLOCK_K)
            un = SIGN * v
            act = _active(up, ok, un, neg, MARGIN, SEMI_HARD)
            per_pos += tl.sum(act, 2)
            per_neg = tl.sum(act, 1)
            acc_c += tl.sum(per_neg * (MARGIN - un), 1)
            count += tl.sum(per_neg, 1)
        acc_t += tl.sum(per_pos * up, 1)
    keep = rows < n
    tl.store(SUMS + rows * 2, acc_t, mask=keep)
    tl.store(SUMS + rows * 2 + 1, acc_c, mask=keep)
    tl.store(COUNTS + rows * 2, count, mask=keep)
    tl.store(COUNTS + rows * 2 + 1, count, mask=keep)


@triton.jit
def triplet_bwd_dx(X, R, XSQ, RSQ, Y, RY, ORDER, LO, HI, GS, DX, DRP, RSCALE, n, m, d, sx, sr, self_offset, TOL,
                   MARGIN, SIGN, EUCLID: tl.constexpr, HAS_SELF: tl.constexpr, SEMI_HARD: tl.constexpr,
                   REF_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr, KP: tl.constexpr):
    rows, feats, acc, h_sum = grad_program(BLOCK_M, BLOCK_D)
    keep = rows < n
    gt = tl.load(GS + rows * 2, mask=keep, other=0.0)
    gc = tl.load(GS + rows * 2 + 1, mask=keep, other=0.0)
    for k0 in range(0, _slot_count(LO, HI, rows, n), KP):
        pcols, ok = _slots(ORDER, LO, HI, rows, k0, n, self_offset, HAS_SELF, KP)
        vp = _slot_values(X, R, XSQ, RSQ, rows, pcols, ok, n, d, sx, sr, TOL, EUCLID, BLOCK_M, KP, BLOCK_K)
        up = SIGN * vp
        per_pos = tl.zeros([BLOCK_M, KP], dtype=tl.float32)
        for c0 in range(0, m, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            v, pos, neg = pair_tile(X, R, XSQ, RSQ, Y, RY, rows, cols, n, m, d, sx, sr, self_offset, TOL,
                                    EUCLID, HAS_SELF, BLOCK_M, BLOCK_N, BLOCK_K)
            act = _active(up, ok, SIGN * v, neg, MARGIN, SEMI_HARD)
            per_pos += tl.sum(act, 2)
            part, h = weighted_dot(-SIGN * gc[:, None] * tl.sum(act, 1), v, R, cols, feats, m, d, sr, EUCLID, False)
            acc += part
            if EUCLID:
                h_sum += tl.sum(h, 1)
        # The slots' own gradient: dL/dV_p = sign·gt·c_p, through the gathered reference rows.
        hp = SIGN * gt[:, None] * per_pos
        wp = hp
        if EUCLID:
            hp = tl.where(vp > 0, hp / tl.where(vp > 0, vp, 1.0), 0.0)
            wp = -hp
            h_sum += tl.sum(hp, 1)
        in_feats = ok[:, :, None] & (feats[None, None, :] < d)
        offsets = pcols[:, :, None].to(tl.int64) * sr + feats[None, None, :]
        acc += tl.sum(wp[:, :, None] * tl.load(R + offsets, mask=in_feats, other=0.0).to(tl.float32), 1)
        if REF_GRAD:
            xb = load_block(X, rows, feats, n, d, sx).to(tl.float32)
            tl.atomic_add(DRP + pcols[:, :, None].to(tl.int64) * d + feats[None, None, :],
                          wp[:, :, None] * xb[:, None, :], mask=in_feats)
            if EUCLID:
                tl.atomic_add(RSCALE + pcols, hp, mask=ok & (tl.program_id(1) == 0))
    store_grad(DX, X, rows, feats, n, d, sx, acc, h_sum, EUCLID)


@triton.jit
def triplet_bwd_dr(X, R, XSQ, RSQ, Y, RY, ORDER, LO, HI, GS, DR, n, m, d, sx, sr, self_offset, TOL,
                   MARGIN, SIGN, EUCLID: tl.constexpr, HAS_SELF: tl.constexpr, SEMI_HARD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   KP: tl.constexpr):
    """The negatives' share of dR (the positives' comes from `triplet_bwd_dx`)."""
    cols, feats, acc, h_sum = grad_program(BLOCK_N, BLOCK_D)
    for r0 in range(0, n, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        gc = tl.load(GS + rows * 2 + 1, mask=rows < n, other=0.0)
        v, pos, neg = pair_tile(X, R, XSQ, RSQ, Y, RY, rows, cols, n, m, d, sx, sr, self_offset, TOL,
                                EUCLID, HAS_SELF, BLOCK_M, BLOCK_N, BLOCK_K)
        un = SIGN * v
        per_neg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, _slot_count(LO, HI, rows, n), KP):
            pcols, ok = _slots(ORDER, LO, HI, rows, k0, n, self_offset, HAS_SELF, KP)
            up = SIGN * _slot_values(X, R, XSQ, RSQ, rows, pcols, ok, n, d, sx, sr, TOL, EUCLID, BLOCK_M, KP,
                                     BLOCK_K)
            per_neg += tl.sum(_active(up, ok, un, neg, MARGIN, SEMI_HARD), 1)
        part, h = weighted_dot(-SIGN * gc[:, None] * per_neg, v, X, rows, feats, n, d, sx, EUCLID, True)
        acc += part
        if EUCLID:
            h_sum += tl.sum(h, 0)
    store_grad(DR, R, cols, feats, m, d, sr, acc, h_sum, EUCLID)
