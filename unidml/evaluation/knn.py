"""Exact k-nearest-neighbour search over one gallery shard, and the exact cross-shard merge.

FAISS (CPU or GPU) only proposes candidates. The final order comes from `scoring.exact_scores`
(float64, one fixed summation order) sorted by (score descending, global gallery index ascending),
so exact duplicates are true ties broken by the smaller index, and the ids are the same on any CPU,
GPU, shard count and query block size. Enough candidates are taken that float32 error cannot push a
true top-k item out: with E a bound on |FAISS score - exact score| (`scoring.score_error_bound`),
every reference left out scores at most last + E, while the k proposals at or above the k-th score
f_k score at least f_k - E; so when f_k - last > 2E the true top k is among the proposals, and only
the proposals within 2E of f_k need re-scoring. Otherwise the row is searched again with twice the
candidates, up to the whole shard. A FAISS "no result" (-1) or a non-finite float32 score is never
mapped to a gallery id: such a row is widened, and finally scored exactly against the whole shard.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from unidml.config import METRICS
from unidml.evaluation.distributed import Collectives
from unidml.evaluation.scoring import (
    THREADS,
    TILE_BYTES,
    exact_scores,
    row_norms,
    score_error_bound,
)

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  # FAISS GPU's largest k for a flat index search
FETCH_BYTES = 12  # one FAISS proposal: float32 score, int64 id
ENTRY_BYTES = 16  # one final neighbour: float64 score, int64 id
FINISH_GROUP = 2048  # rows re-scored together (at the largest width among them)
CPU_SEARCH_TILE_BYTES = 4096 * 1024 * 4  # FAISS CPU's internal BLAS score tile


@dataclass(frozen=True)
class TopK:
    """Neighbour lists of a block of queries: `scores` (n, k) float64 exact scores, `ids` (n, k) int64
    global gallery indices, sorted by (-score, id); missing entries (gallery smaller than k) have id -1
    and score -inf."""

    scores: np.ndarray
    ids: np.ndarray


def faiss_gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def describe_faiss() -> str:
    """Which FAISS this process searches with: its version and whether it is a GPU build that sees a GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return f"FAISS {faiss.__version__} (CPU build)"
    gpus = faiss.get_num_gpus()
    return f"FAISS {faiss.__version__} (GPU build, {gpus} GPU{'' if gpus == 1 else 's'} visible)"


def announce_faiss(device: torch.device) -> None:
    """Log at run start which FAISS evaluation uses; on a CUDA run with a CPU-only FAISS, say how to
    get GPU search (the `gpu` extra leaves faiss-cpu in place, docs/cluster.md)."""
    line = describe_faiss()
    if device.type == "cuda" and not faiss_gpu_available():
        line += ": k-NN search runs on the CPU; for GPU search replace faiss-cpu by faiss-gpu (docs/cluster.md)"
    log.info(line)


@functools.cache
def gpu_resources(device_index: int) -> "faiss.StandardGpuResources":
    """One FAISS `StandardGpuResources` per GPU for the whole process: each one reserves scratch memory
    (about 1.5 GiB by default), so every evaluation reuses it instead of allocating its own."""
    return faiss.StandardGpuResources()


@contextlib.contextmanager
def _full_float32_matmul() -> Iterator[None]:
    """Torch matmuls in true float32 (no TF32 / bf16 passes), as the error bound assumes."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def sort_rows(scores: np.ndarray, ids: np.ndarray) -> TopK:
    """Order every row by decreasing score, then increasing id (ids of -1 go last)."""
    key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_ids, -scores), axis=1)
    return TopK(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1))


def merge_topk(parts: list[TopK], k: int) -> TopK:
    """Exact top-k of the union of several neighbour lists of the same queries (ties: smaller id)."""
    if len(parts) == 1:
        return TopK(parts[0].scores[:, :k], parts[0].ids[:, :k])
    merged = sort_rows(np.concatenate([p.scores for p in parts], 1), np.concatenate([p.ids for p in parts], 1))
    return TopK(merged.scores[:, :k], merged.ids[:, :k])


def drop_self(top: TopK, query_ids: np.ndarray, k: int) -> TopK:
    """Remove each query's own index from its list (exclusion by index: duplicates stay) and keep k."""
    have = top.ids.shape[1]
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
    scores = np.full((n, k), -np.inf, np.float64)
    ids = np.full((n, k), -1, np.int64)
    scores[:, :min(have, k)] = top.scores[:, :k]
    ids[:, :min(have, k)] = top.ids[:, :k]
    return TopK(scores, ids)


class ShardIndex:
    """A FAISS flat index over one gallery shard that proposes candidates, and the stored float32
    vectors that re-score them exactly (ties by global id).

    Uses `GpuIndexFlatIP`/`GpuIndexFlatL2` when `device` is CUDA and FAISS has GPU support, else
    `IndexFlatIP`/`IndexFlatL2` on the CPU. Proposals beyond FAISS GPU's k limit come from a float32
    torch matmul on the same device.
    """

    def __init__(self, vectors: np.ndarray, global_ids: np.ndarray, metric: str = "cosine",
                 device: torch.device | str = "cpu") -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
        self.metric = metric
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.global_ids = np.asarray(global_ids, dtype=np.int64)
        self.ntotal, self.dim = self.vectors.shape
        self.max_norm = float(row_norms(self.vectors).max(initial=0.0))
        contiguous = self.ntotal > 0 and np.array_equal(self.global_ids, self.global_ids[0] + np.arange(self.ntotal))
        self.id_offset = int(self.global_ids[0]) if contiguous else None
        device = torch.device(device)
        self.on_gpu = device.type == "cuda" and faiss_gpu_available()
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self._device_vectors: torch.Tensor | None = None
        if self.on_gpu:
            config = faiss.GpuIndexFlatConfig()
            config.device = device.index if device.index is not None else torch.cuda.current_device()
            cls = faiss.GpuIndexFlatIP if metric == "cosine" else faiss.GpuIndexFlatL2
            self.index = cls(gpu_resources(config.device), self.dim, config)
        else:
            self.index = faiss.IndexFlatIP(self.dim) if metric == "cosine" else faiss.IndexFlatL2(self.dim)
        if self.ntotal:
            self.index.add(self.vectors)

    @property
    def max_k(self) -> int:
        """Largest k one FAISS search accepts here."""
        return GPU_MAX_K if self.on_gpu else max(self.ntotal, 1)

    def _global(self, local: np.ndarray) -> np.ndarray:
        """Global gallery ids of (valid, >= 0) local positions."""
        return local + self.id_offset if self.id_offset is not None else self.global_ids[local]

    def _propose(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 higher-is-closer scores, local ids) of m proposals per query, best first."""
        if m <= self.max_k:
            dist, local = self.index.search(queries, m)
            return (dist if self.metric == "cosine" else -dist), local
        if self._device_vectors is None:
            self._device_vectors = torch.from_numpy(self.vectors).to(self.device)
        g = self._device_vectors
        q = torch.from_numpy(queries).to(self.device)
        with _full_float32_matmul():
            scores = q @ g.T
        if self.metric == "euclidean":
            scores = 2 * scores - (q * q).sum(1, keepdim=True) - (g * g).sum(1)[None, :]
        f, local = torch.topk(scores, m, dim=1)
        return f.cpu().numpy(), local.cpu().numpy()

    def search(self, queries: np.ndarray, k: int, memory_budget_bytes: int) -> TopK:
        """Exact top-k of each query in this shard (fewer columns are padded with id -1)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        if self.ntotal == 0 or k == 0:
            return pad(TopK(np.zeros((n, 0), np.float64), np.zeros((n, 0), np.int64)), k)
        k_eff = min(k, self.ntotal)
        slack = 2.0 * score_error_bound(row_norms(queries), self.max_norm, self.dim, self.metric)
        out = TopK(np.empty((n, k_eff), np.float64), np.empty((n, k_eff), np.int64))
        rows = np.arange(n)
        fetch = min(self.ntotal, k_eff + max(8, k_eff // 4))
        while len(rows):
            rows = self._settle(queries, rows, k_eff, fetch, slack, out, memory_budget_bytes)
            fetch = min(self.ntotal, 2 * fetch)
        return pad(out, k)

    def _settle(self, queries: np.ndarray, rows: np.ndarray, k: int, fetch: int, slack: np.ndarray, out: TopK,
                memory_budget_bytes: int) -> np.ndarray:
        """Propose `fetch` candidates for `rows` (in chunks that fit the budget), settle them and
        return the rows that need more candidates."""
        unsettled = [np.zeros(0, np.int64)]
        chunk = max(1, memory_budget_bytes // (FETCH_BYTES * 3 * fetch))
        for start in range(0, len(rows), chunk):
            sel = rows[start:start + chunk]
            f, local = self._propose(queries[sel], fetch)
            unsettled.append(self._settle_proposed(queries, sel, f, local, k, fetch, slack, out, memory_budget_bytes))
        return np.concatenate(unsettled)

    def _settle_proposed(self, queries: np.ndarray, sel: np.ndarray, f: np.ndarray, local: np.ndarray, k: int,
                         fetch: int, slack: np.ndarray, out: TopK, memory_budget_bytes: int) -> np.ndarray:
        """Finish each row of `sel` whose k-th proposal is more than its slack (2E) above the last
        one, or that got the whole shard; return the others."""
        everything = fetch == self.ntotal
        usable = (local >= 0).all(1) & np.isfinite(f).all(1)
        done = usable & (everything | (f[:, k - 1] - f[:, -1] > slack[sel]))
        d = np.flatnonzero(done)
        # Only proposals within 2E of the k-th can reach the exact top k (proposals are sorted);
        # rows are re-scored in groups of similar width.
        widths = (f[d] >= f[d, k - 1:k] - slack[sel[d], None]).sum(1)
        order = np.argsort(widths, kind="stable")
        for group in np.array_split(order, -(-len(order) // FINISH_GROUP)) if len(order) else ():
            width = int(widths[group[-1]])
            self._finish(queries, sel[d[group]], local[d[group], :width], k, out)
        if everything:
            self._finish_from_whole_shard(queries, sel[~usable], k, out, memory_budget_bytes)
            return np.zeros(0, np.int64)
        return sel[~done]

    def _finish(self, queries: np.ndarray, rows: np.ndarray, local: np.ndarray, k: int, out: TopK) -> None:
        """Exact scores of the candidates `local` (n, m >= k) of `rows`; store their top k."""
        top = sort_rows(exact_scores(queries[rows], self.vectors, local, self.metric), self._global(local))
        out.scores[rows], out.ids[rows] = top.scores[:, :k], top.ids[:, :k]

    def _finish_from_whole_shard(self, queries: np.ndarray, rows: np.ndarray, k: int, out: TopK,
                                 memory_budget_bytes: int) -> None:
        """Rows FAISS gave no usable proposals for (NaN or overflowed float32 scores): score them
        exactly against every reference of the shard."""
        chunk = max(1, memory_budget_bytes // (5 * ENTRY_BYTES * self.ntotal))
        for start in range(0, len(rows), chunk):
            sel = rows[start:start + chunk]
            self._finish(queries, sel, np.broadcast_to(np.arange(self.ntotal), (len(sel), self.ntotal)), k, out)

    def local_positions(self, ids: np.ndarray) -> np.ndarray:
        """Local position of each global id in this shard, -1 where the shard does not hold it."""
        if self.id_offset is not None:
            pos = ids - self.id_offset
            return np.where((pos >= 0) & (pos < self.ntotal), pos, -1)
        order = np.argsort(self.global_ids, kind="stable")
        at = np.clip(np.searchsorted(self.global_ids[order], ids), 0, max(self.ntotal - 1, 0))
        if self.ntotal == 0:
            return np.full(ids.shape, -1, np.int64)
        return np.where(self.global_ids[order[at]] == ids, order[at], -1)

    def scores_at(self, queries: np.ndarray, local: np.ndarray) -> TopK:
        """Exact scores of query i against the references at `local[i]` (-1: none), sorted like a TopK."""
        valid = local >= 0
        if self.ntotal == 0:
            return TopK(np.full(local.shape, -np.inf), np.full(local.shape, -1, np.int64))
        safe = np.where(valid, local, 0)
        scores = np.where(valid, exact_scores(np.ascontiguousarray(queries, np.float32), self.vectors, safe,
                                              self.metric), -np.inf)
        return sort_rows(scores, np.where(valid, self._global(safe), -1))

    def count_above(self, queries: np.ndarray, thresholds: TopK, exclude_ids: np.ndarray | None,
                    memory_budget_bytes: int) -> np.ndarray:
        """(n, w) counts of this shard's references ranked above each threshold (score, id) of query i,
        i.e. with a higher exact score or an equal one and a smaller id; `exclude_ids[i]` is not counted.

        Each query's whole shard is proposed, sorted, by FAISS: a reference whose float32 score is more
        than E above the threshold is above it, more than E below is not; only those within E are
        re-scored exactly (E: `scoring.score_error_bound`).
        """
        queries = np.ascontiguousarray(queries, np.float32)
        n, w = thresholds.ids.shape
        counts = np.zeros((n, w), np.int64)
        if self.ntotal == 0 or w == 0 or n == 0:
            return counts
        slack = score_error_bound(row_norms(queries), self.max_norm, self.dim, self.metric)
        chunk = max(1, memory_budget_bytes // (FETCH_BYTES * 3 * self.ntotal))
        for start in range(0, n, chunk):
            f, local = self._propose(queries[start:start + chunk], self.ntotal)
            for r in range(len(f)):
                i = start + r
                counts[i] = self._count_row(queries[i], f[r], local[r], slack[i], thresholds.scores[i],
                                            thresholds.ids[i])
        if exclude_ids is not None:
            own = self.local_positions(np.asarray(exclude_ids, np.int64))
            has = np.flatnonzero(own >= 0)
            mine = self.scores_at(queries[has], own[has, None])
            s, gid = mine.scores, mine.ids  # (len(has), 1)
            thr_s, thr_id = thresholds.scores[has], thresholds.ids[has]
            counts[has] -= ((s > thr_s) | ((s == thr_s) & (gid < thr_id))).astype(np.int64)
        counts[thresholds.ids < 0] = 0
        return counts

    def _count_row(self, query: np.ndarray, f: np.ndarray, local: np.ndarray, slack: float, thr_s: np.ndarray,
                   thr_id: np.ndarray) -> np.ndarray:
        """`count_above` for one query from its sorted whole-shard proposals (f descending, local ids)."""
        if not ((local >= 0).all() and np.isfinite(f).all()):  # unusable proposals: the exact sorted row
            every = np.arange(self.ntotal)[None, :]
            exact = sort_rows(exact_scores(query[None], self.vectors, every, self.metric), every)
            f, local, slack = exact.scores[0], exact.ids[0], 0.0
        neg = -f.astype(np.float64)  # ascending
        above = np.searchsorted(neg, -(thr_s + slack), side="left")  # float32 score > threshold + E
        stop = np.searchsorted(neg, -(thr_s - slack), side="right")  # float32 score >= threshold - E
        lens = np.maximum(stop - above, 0)
        if not lens.sum():
            return above
        owner = np.repeat(np.arange(len(thr_s)), lens)
        pos = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(above, lens)
        cand = local[pos]
        s = exact_scores(query[None], self.vectors, cand[None], self.metric)[0]
        gid = self._global(cand)
        wins = (s > thr_s[owner]) | ((s == thr_s[owner]) & (gid < thr_id[owner]))
        return above + np.bincount(owner, weights=wins, minlength=len(thr_s)).astype(np.int64)


def fixed_search_bytes(on_gpu: bool = False) -> int:
    """Working memory of a search that does not grow with the query block: the re-scoring tiles
    (float64 and a float32 gather per thread) and, on the CPU, FAISS's 16 MiB score tile."""
    return 2 * THREADS * TILE_BYTES + (0 if on_gpu else CPU_SEARCH_TILE_BYTES)


def query_block_size(num_queries: int, k: int, world_size: int, dim: int, memory_budget_mb: float,
                     on_gpu: bool = False) -> int:
    """Queries per search block so that the block's working memory fits `memory_budget_mb`.

    Per query row: FAISS's proposals at the first fetch size (at most 2k + 8) with their checks and
    copies, 3 x 12 bytes each; the exact top-k, the all-gathered lists of every rank and their merge,
    16 bytes an entry; the query vector. Fixed: the re-scoring tile (float64 and its float32 gather)
    and, on the CPU, FAISS's 16 MiB score tile.
    """
    fixed = fixed_search_bytes(on_gpu)
    budget = int(memory_budget_mb * 2**20) - fixed
    per_row = FETCH_BYTES * 3 * (2 * k + 8) + ENTRY_BYTES * (2 + 2 * world_size) * k + 4 * dim + 16
    if budget < per_row:
        raise ValueError(f"eval.memory_budget_mb={memory_budget_mb} is too small for k={k}, dim={dim} "
                         f"(needs at least {(fixed + per_row) / 2**20:.1f})")
    return max(1, min(num_queries, budget // per_row))


def iter_sharded_topk(queries: np.ndarray, query_ids: np.ndarray, index: ShardIndex, k: int, *,
                      self_retrieval: bool, memory_budget_mb: float, comm: Collectives) -> Iterator[tuple[int, TopK]]:
    """(first row, exact merged top-k) for each block of queries; every rank must call it alike."""
    fetch = k + int(self_retrieval)
    block = query_block_size(len(queries), fetch, comm.world_size, queries.shape[1], memory_budget_mb, index.on_gpu)
    budget_bytes = int(memory_budget_mb * 2**20)
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        top = index.search(queries[start:stop], fetch, budget_bytes)
        if self_retrieval:
            top = drop_self(top, query_ids[start:stop], k)
        parts = [TopK(s, i) for s, i in zip(comm.all_gather_equal(top.scores), comm.all_gather_equal(top.ids))]
        yield start, merge_topk(parts, k)
