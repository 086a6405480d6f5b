"""Exact k-nearest-neighbour search over one gallery shard with FAISS, and the exact cross-shard merge.

Scores are "higher is closer": the inner product for cosine (L2-normalised inputs) and the negated
squared distance for Euclidean. Ties are broken by the smaller global gallery index, exactly: FAISS's
own order among equal scores is arbitrary, so each row is re-sorted by (-score, index), and a row whose
k-th score equals the last fetched score (a tie that may continue beyond what was fetched) is searched
again with a doubled k until the tie is inside the fetched list. FAISS is forced onto its BLAS path so
that the score of a (query, reference) pair is bit-identical whatever block or shard it is computed in.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import faiss
import numpy as np
import torch

METRICS = ("cosine", "euclidean")
GPU_MAX_K = 2048  # FAISS GPU's largest k for a flat index search
ENTRY_BYTES = 12  # one (float32 score, int64 id) pair
CPU_SEARCH_TILE_BYTES = 4096 * 1024 * 4  # FAISS CPU's internal BLAS score tile


@dataclass(frozen=True)
class TopK:
    """Neighbour lists of a block of queries: `scores` (n, k) float32, `ids` (n, k) int64 global gallery
    indices sorted by (-score, id); missing entries (gallery smaller than k) have id -1 and score -inf."""

    scores: np.ndarray
    ids: np.ndarray


def faiss_gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@contextlib.contextmanager
def _blas_path_always() -> Iterator[None]:
    """Make FAISS CPU flat search use its BLAS kernel for every block size (bit-identical pair scores)."""
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def sort_rows(scores: np.ndarray, ids: np.ndarray) -> TopK:
    """Order every row by decreasing score, then increasing id (ids of -1 go last)."""
    key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_ids, -scores), axis=1)
    return TopK(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1))


def merge_topk(parts: list[TopK], k: int) -> TopK:
    """Exact top-k of the union of several neighbour lists of the same queries (ties: smaller id)."""
    merged = sort_rows(np.concatenate([p.scores for p in parts], 1), np.concatenate([p.ids for p in parts], 1))
    return TopK(merged.scores[:, :k], merged.ids[:, :k])


def drop_self(top: TopK, query_ids: np.ndarray, k: int) -> TopK:
    """Remove each query's own index from its list (exclusion by index: duplicates stay) and keep k."""
    is_self = top.ids == query_ids[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    scores = np.take_along_axis(top.scores, order, 1)
    ids = np.take_along_axis(top.ids, order, 1)
    moved = np.take_along_axis(is_self, order, 1)
    scores[moved] = -np.inf
    ids[moved] = -1
    return pad(TopK(scores, ids), k)


def pad(top: TopK, k: int) -> TopK:
    """Extend rows to k entries with (score -inf, id -1); entries of a removed self are blanked too."""
    n, have = top.ids.shape
    scores = np.full((n, k), -np.inf, np.float32)
    ids = np.full((n, k), -1, np.int64)
    scores[:, :min(have, k)] = top.scores[:, :k]
    ids[:, :min(have, k)] = top.ids[:, :k]
    return TopK(scores, ids)


class ShardIndex:
    """A FAISS flat index over one contiguous gallery shard, searched exactly (ties by global id).

    Uses `GpuIndexFlatIP`/`GpuIndexFlatL2` when `device` is CUDA and FAISS has GPU support, else
    `IndexFlatIP`/`IndexFlatL2` on the CPU.
    """

    def __init__(self, vectors: np.ndarray, global_ids: np.ndarray, metric: str = "cosine",
                 device: torch.device | str = "cpu") -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
        self.metric = metric
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.global_ids = np.asarray(global_ids, dtype=np.int64)
        self.ntotal, dim = self.vectors.shape
        device = torch.device(device)
        self.on_gpu = device.type == "cuda" and faiss_gpu_available()
        if self.on_gpu:
            self._resources = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.device = device.index if device.index is not None else torch.cuda.current_device()
            cls = faiss.GpuIndexFlatIP if metric == "cosine" else faiss.GpuIndexFlatL2
            self.index = cls(self._resources, dim, config)
        else:
            self.index = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
        if self.ntotal:
            self.index.add(self.vectors)

    @property
    def max_k(self) -> int:
        """Largest k one FAISS search accepts here."""
        return GPU_MAX_K if self.on_gpu else max(self.ntotal, 1)

    def _search(self, queries: np.ndarray, k: int) -> TopK:
        with _blas_path_always():
            dist, local = self.index.search(queries, k)
        scores = dist if self.metric == "cosine" else -dist
        ids = np.where(local >= 0, self.global_ids[np.maximum(local, 0)], -1)
        return sort_rows(scores.astype(np.float32, copy=False), ids)

    def _full_rows(self, queries: np.ndarray) -> TopK:
        """All scores of a few queries (the GPU fallback past FAISS's k limit), computed in torch."""
        q = torch.from_numpy(queries)
        g = torch.from_numpy(self.vectors)
        scores = q @ g.T if self.metric == "cosine" else -torch.cdist(q, g).square()
        ids = np.broadcast_to(self.global_ids, scores.shape).copy()
        return sort_rows(scores.numpy(), ids)

    def search(self, queries: np.ndarray, k: int, memory_budget_bytes: int) -> TopK:
        """Exact top-k of each query in this shard (fewer columns are padded with id -1)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        if self.ntotal == 0 or k == 0:
            return pad(TopK(np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)), k)
        k_eff = min(k, self.ntotal)
        out_scores = np.empty((n, k_eff), np.float32)
        out_ids = np.empty((n, k_eff), np.int64)
        rows = np.arange(n)
        fetch = min(self.ntotal, k_eff + max(8, k_eff // 4))
        while len(rows):
            if fetch > self.max_k:
                # Past FAISS GPU's k limit: resolve the remaining tied rows from their full score rows.
                chunk = max(1, memory_budget_bytes // max(1, ENTRY_BYTES * 2 * self.ntotal))
                for start in range(0, len(rows), chunk):
                    sel = rows[start:start + chunk]
                    top = self._full_rows(queries[sel])
                    out_scores[sel], out_ids[sel] = top.scores[:, :k_eff], top.ids[:, :k_eff]
                break
            unresolved = []
            chunk = max(1, memory_budget_bytes // (ENTRY_BYTES * 3 * fetch))
            for start in range(0, len(rows), chunk):
                sel = rows[start:start + chunk]
                top = self._search(queries[sel], fetch)
                tied = (top.scores[:, k_eff - 1] == top.scores[:, fetch - 1]) if fetch < self.ntotal \
                    else np.zeros(len(sel), bool)
                done = ~tied
                out_scores[sel[done]] = top.scores[done, :k_eff]
                out_ids[sel[done]] = top.ids[done, :k_eff]
                unresolved.append(sel[tied])
            rows = np.concatenate(unresolved)
            fetch = min(self.ntotal, 2 * fetch)
        return pad(TopK(out_scores, out_ids), k)


def query_block_size(num_queries: int, k: int, world_size: int, dim: int, memory_budget_mb: float,
                     on_gpu: bool = False) -> int:
    """Queries per search block so that the block's working memory fits `memory_budget_mb`.

    Per query row: FAISS's output and its sorted copy at the fetch size (k plus a margin, counted as
    2k) as (score, id) pairs, the all-gathered lists of every rank and their merge (2 * world_size * k
    pairs), and the query vector itself. On the CPU FAISS also holds a fixed 16 MiB score tile.
    """
    budget = int(memory_budget_mb * 2**20) - (0 if on_gpu else CPU_SEARCH_TILE_BYTES)
    per_row = ENTRY_BYTES * (3 * 2 * k + 2 * world_size * k) + 4 * dim
    if budget < per_row:
        raise ValueError(f"eval.memory_budget_mb={memory_budget_mb} is too small for k={k}, dim={dim}")
    return max(1, min(num_queries, budget // per_row))


def cap_k(k: int, needed_by: str, on_gpu: bool, self_retrieval: bool) -> int:
    """Cap k at FAISS GPU's limit (one slot kept for the query itself in self-retrieval), with a warning."""
    limit = GPU_MAX_K - int(self_retrieval)
    if on_gpu and k > limit:
        warnings.warn(f"evaluation: k={k} (needed by {needed_by}) exceeds FAISS GPU's limit; using k={limit}, "
                      f"so metrics needing more neighbours are lower bounds", stacklevel=3)
        return limit
    return k
