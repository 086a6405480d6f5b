"""The scores that define the ranking: float64, computed in one fixed order, the same on any hardware.

A score is "higher is closer": the inner product for cosine (on L2-normalised vectors) and the negated
squared distance for Euclidean. `exact_scores` computes it from the stored float32 vectors with
elementwise float64 operations only (a product of two float32 numbers is exact in float64) and a
pairwise sum over the dimension whose order depends on the dimension alone. No BLAS call, SIMD width,
thread count, tile size, block or shard position enters the result, so exact duplicates score exactly
alike and every machine ranks alike. FAISS, which sums in float32 in a hardware-dependent order, only
proposes candidates; `score_error_bound` says how far its scores can be from these.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

U32 = 2.0 ** -24  # unit roundoff of float32
U64 = 2.0 ** -53  # unit roundoff of float64
SAFETY = 2.0  # margin on top of the worst-case bounds below
TILE_BYTES = 2 ** 20  # float64 workspace of one re-scoring tile (stays in a core's cache)
THREADS = min(4, os.cpu_count() or 1)  # re-scoring threads
NORM_EPS = 1e-12  # the smallest norm divided by (torch's F.normalize uses the same)


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of an n-term float sum in any order."""
    return n * u / (1.0 - n * u)


def pairwise_sum(p: np.ndarray) -> np.ndarray:
    """Sum over the last axis in a fixed pairwise order (it overwrites `p`): the upper half is added
    onto the lower half until one column is left. Elementwise IEEE additions only, so the result
    depends on the values and the width alone."""
    width = p.shape[-1]
    if width == 0:
        return np.zeros(p.shape[:-1], p.dtype)
    while width > 1:
        half = width // 2
        np.add(p[..., :half], p[..., width - half:width], out=p[..., :half])
        width -= half
    return p[..., 0].copy()


def row_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norm of every row, in float64 (fixed order, see `pairwise_sum`)."""
    x = np.asarray(x)
    out = np.empty(len(x), np.float64)
    rows = max(1, TILE_BYTES // max(1, 8 * x.shape[1]))
    for start in range(0, len(x), rows):
        p = x[start:start + rows].astype(np.float64)
        np.multiply(p, p, out=p)
        out[start:start + rows] = np.sqrt(pairwise_sum(p))
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their float64 norm (at least NORM_EPS), rounded once to float32."""
    x = np.asarray(x, np.float32)
    out = np.empty(x.shape, np.float32)
    rows = max(1, TILE_BYTES // max(1, 8 * x.shape[1]))
    for start in range(0, len(x), rows):
        part = x[start:start + rows]
        norms = np.maximum(row_norms(part), NORM_EPS)
        with np.errstate(invalid="ignore"):  # non-finite rows stay non-finite; evaluation reports them
            out[start:start + rows] = part.astype(np.float64) / norms[:, None]
    return out


def exact_scores(queries: np.ndarray, vectors: np.ndarray, candidates: np.ndarray, metric: str) -> np.ndarray:
    """Float64 score of query i against `vectors[candidates[i, j]]`, for all (i, j); (n, m) array.

    Works in tiles of at most TILE_BYTES, spread over up to THREADS threads (numpy releases the GIL);
    neither tiles nor threads change the result (see the module doc).
    """
    n, m = candidates.shape
    out = np.empty((n, m), np.float64)
    if n == 0 or m == 0:
        return out
    tiles = n * m * queries.shape[1] // (TILE_BYTES // 8)
    parts = np.array_split(np.arange(n), max(1, min(THREADS, n, tiles // 2)))
    if len(parts) == 1:
        _score_rows(queries, vectors, candidates, metric, out)
        return out
    with ThreadPoolExecutor(len(parts)) as pool:
        list(pool.map(lambda rows: _score_rows(queries[rows], vectors, candidates[rows], metric, out, rows[0]),
                      parts))
    return out


def _score_rows(queries: np.ndarray, vectors: np.ndarray, candidates: np.ndarray, metric: str, out: np.ndarray,
                first: int = 0) -> None:
    """`exact_scores` of a run of rows into out[first:first + len(queries)], tile by tile."""
    n, m = candidates.shape
    dim = queries.shape[1]
    cols = max(1, min(m, TILE_BYTES // (8 * dim)))
    rows = max(1, TILE_BYTES // (8 * dim * cols))
    work = np.empty(rows * cols * dim, np.float64)
    gathered = np.empty(rows * cols * dim, vectors.dtype)
    for r0 in range(0, n, rows):
        q = queries[r0:r0 + rows].astype(np.float64)[:, None, :]
        for c0 in range(0, m, cols):
            tile = candidates[r0:r0 + rows, c0:c0 + cols]
            g = gathered[:tile.size * dim].reshape(tile.shape + (dim,))
            np.take(vectors, tile, axis=0, out=g)
            p = work[:g.size].reshape(g.shape)
            if metric == "cosine":
                np.multiply(g, q, out=p)  # exact: 24-bit x 24-bit mantissas fit in 53 bits
                out[first + r0:first + r0 + len(tile), c0:c0 + cols] = pairwise_sum(p)
            else:
                np.subtract(g, q, out=p)
                np.multiply(p, p, out=p)
                out[first + r0:first + r0 + len(tile), c0:c0 + cols] = -pairwise_sum(p)


def score_error_bound(query_norms: np.ndarray, max_norm: float, dim: int, metric: str) -> np.ndarray:
    """Per query, a bound on |float32 score - `exact_scores`| valid for every reference of norm <= max_norm.

    A float32 dot product of length d, summed in any order (BLAS blocks, SIMD lanes, FMA, GPU) is off
    by at most gamma_d(u32) * sum|q_i x_i| <= gamma_d(u32) ||q|| ||x|| (Cauchy-Schwarz); our float64
    sum adds gamma_d(u64) of the same. FAISS's squared distance, ||q||^2 + ||x||^2 - 2 q.x or
    sum (q_i - x_i)^2, is off by at most gamma_{d+3} (||q|| + ||x||)^2 (three norms/products of d
    terms, two more roundings; its clamp at 0 only moves towards the truth). Underflow adds at most
    half the smallest float32 subnormal per operation. SAFETY doubles the whole bound.
    """
    norms = np.asarray(query_norms, np.float64)
    if metric == "cosine":
        scale = norms * max_norm
        rel = gamma(dim, U32) + gamma(dim, U64)
    else:
        scale = (norms + max_norm) ** 2
        rel = gamma(dim + 3, U32) + gamma(dim + 3, U64)
    return SAFETY * (rel * scale + (2 * dim + 3) * 2.0 ** -150)
