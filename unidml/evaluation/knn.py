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


def order_ties(scores: np.ndarray, ids: np.ndarray) -> TopK:
    """`sort_rows` for lists that FAISS already sorted by score: only rows holding equal scores are
    re-sorted (rows not sorted by score, which FAISS never returns, are fully sorted too)."""
    step = np.diff(scores, axis=1)
    redo = np.flatnonzero(((step == 0) | ~(step <= 0)).any(1))
    if len(redo):
        fixed = sort_rows(scores[redo], ids[redo])
        scores, ids = scores.copy(), ids.copy()
        scores[redo], ids[redo] = fixed.scores, fixed.ids
    return TopK(scores, ids)


def merge_topk(parts: list[TopK], k: int) -> TopK:
    """Exact top-k of the union of several neighbour lists of the same queries (ties: smaller id)."""
    if len(parts) == 1:
        return TopK(parts[0].scores[:, :k], parts[0].ids[:, :k])
    merged = sort_rows(np.concatenate([p.scores for p in parts], 1), np.concatenate([p.ids for p in parts], 1))
    return TopK(merged.scores[:, :k], merged.ids[:, :k])


def drop_self(top: TopK, query_ids: np.ndarray, k: int) -> TopK:
    """Remove each query's own index from its list (exclusion by index: duplicates stay) and keep k."""
    n, have = top.ids.shape
    is_self = top.ids == query_ids[:, None]
    position = np.where(is_self.any(1), is_self.argmax(1), have)  # an index occurs at most once per list
    j = np.arange(min(k, have))[None, :]
    source = j + (j >= position[:, None])  # column j of the result: skip the query's own column
    ran_out = source >= have
    cols = np.minimum(source, have - 1)
    scores = np.take_along_axis(top.scores, cols, 1)
    ids = np.take_along_axis(top.ids, cols, 1)
    scores[ran_out], ids[ran_out] = -np.inf, -1
    return pad(TopK(scores, ids), k)


def pad(top: TopK, k: int) -> TopK:
    """Rows cut or extended to k entries, missing ones as (score -inf, id -1)."""
    n, have = top.ids.shape
    if have == k:
        return top
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
        contiguous = self.ntotal > 0 and np.array_equal(self.global_ids, self.global_ids[0] + np.arange(self.ntotal))
        self.id_offset = int(self.global_ids[0]) if contiguous else None
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
        if self.id_offset is not None:  # a contiguous shard: global id = local id + offset
            ids = local + self.id_offset
        else:
            ids = self.global_ids[local]
        return order_ties(scores.astype(np.float32, copy=False), ids)

    def _full_rows(self, queries: np.ndarray) -> TopK:
        """All scores of a few queries, computed in torch: the GPU fallback for ties that run past
        FAISS GPU's k limit (scores may differ from FAISS's in the last bit there)."""
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
        out = TopK(np.empty((n, k_eff), np.float32), np.empty((n, k_eff), np.int64))
        rows = np.arange(n)
        fetch = min(self.ntotal, self.max_k, k_eff + max(8, k_eff // 4))
        while True:
            rows = self._search_rows(queries, rows, k_eff, fetch, out, memory_budget_bytes)
            grown = min(self.ntotal, self.max_k, 2 * fetch)
            if not len(rows) or grown == fetch:
                break
            fetch = grown
        chunk = max(1, memory_budget_bytes // (ENTRY_BYTES * 2 * self.ntotal))
        for start in range(0, len(rows), chunk):  # ties beyond FAISS GPU's k limit
            sel = rows[start:start + chunk]
            top = self._full_rows(queries[sel])
            out.scores[sel], out.ids[sel] = top.scores[:, :k_eff], top.ids[:, :k_eff]
        return pad(out, k)

    def _search_rows(self, queries: np.ndarray, rows: np.ndarray, k: int, fetch: int, out: TopK,
                     memory_budget_bytes: int) -> np.ndarray:
        """Search `rows` with `fetch` neighbours, store the top k of rows whose k-th score is above the
        last fetched one (no tie can continue past the list) and return the other rows."""
        unresolved = []
        chunk = max(1, memory_budget_bytes // (ENTRY_BYTES * 3 * fetch))
        for start in range(0, len(rows), chunk):
            sel = rows[start:start + chunk]
            top = self._search(queries[sel], fetch)
            tied = top.scores[:, k - 1] == top.scores[:, fetch - 1]
            if fetch == self.ntotal:
                tied[:] = False  # everything was fetched
            done = ~tied
            out.scores[sel[done]], out.ids[sel[done]] = top.scores[done, :k], top.ids[done, :k]
            unresolved.append(sel[tied])
        return np.concatenate(unresolved)


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
