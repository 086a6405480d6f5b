"""Retrieval evaluation: sharded exact k-NN (one FAISS shard per rank, exact merge) feeding the metrics.

Every rank holds all queries and its own contiguous shard of the gallery; queries are searched in
blocks sized to `memory_budget_mb`, so no query x gallery matrix is ever formed.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unidml.evaluation.distributed import Collectives
from unidml.evaluation.knn import METRICS, ShardIndex, TopK, cap_k, drop_self, merge_topk, query_block_size
from unidml.evaluation.metrics import NMI, MetricAccumulator, check_request, kmeans_nmi, relevant_counts, required_k

DEFAULT_KS = (1, 10, 100)
DEFAULT_METRICS = ("recall", "map_at_r", "r_precision")


class LabelLookup:
    """Label of a global gallery index; a missing neighbour (id -1) gets MISSING, which matches no label."""

    MISSING = np.iinfo(np.int64).min

    def __init__(self, ids: np.ndarray, labels: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        self.ids, self.labels = ids[order], labels[order]
        # Contiguous ids (the usual case): look labels up by offset instead of by binary search.
        contiguous = len(ids) > 0 and np.array_equal(self.ids, self.ids[0] + np.arange(len(ids)))
        self.first = int(self.ids[0]) if contiguous else None

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self.first is not None:
            pos = ids - self.first
        else:
            pos = np.searchsorted(self.ids, ids)
        pos = np.clip(pos, 0, max(len(self.ids) - 1, 0))
        return np.where(ids >= 0, self.labels[pos], self.MISSING)


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


def sharded_knn(queries: np.ndarray, query_ids: np.ndarray, shard: np.ndarray, shard_ids: np.ndarray, k: int, *,
                self_retrieval: bool, metric: str = "cosine", memory_budget_mb: float = 1024,
                device: torch.device | str = "cpu", comm: Collectives | None = None) -> TopK:
    """Exact top-k neighbours (global ids, ties by smaller id) of all queries over the sharded gallery."""
    comm = comm or Collectives(distributed=False)
    index = ShardIndex(shard, shard_ids, metric, device)
    blocks = [top for _, top in iter_sharded_topk(queries, query_ids, index, k, self_retrieval=self_retrieval,
                                                  memory_budget_mb=memory_budget_mb, comm=comm)]
    if not blocks:
        return TopK(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
    return TopK(np.concatenate([b.scores for b in blocks]), np.concatenate([b.ids for b in blocks]))


def sharded_retrieval_metrics(queries: np.ndarray, query_labels: np.ndarray, query_ids: np.ndarray,
                              shard: np.ndarray, shard_labels: np.ndarray, shard_ids: np.ndarray, *,
                              self_retrieval: bool, ks: Sequence[int], metrics: Sequence[str],
                              metric: str, memory_budget_mb: float, device: torch.device | str,
                              comm: Collectives) -> dict[str, float]:
    """Metrics of all queries (held by every rank) against the gallery spread over the ranks.

    In self-retrieval the query and gallery index spaces are the same and a query's own index is
    excluded from its neighbours. The returned dict is the same on every rank.
    """
    check_request(ks, metrics)
    gallery_ids = np.concatenate(comm.all_gather_rows(shard_ids.astype(np.int64)))
    gallery_labels = np.concatenate(comm.all_gather_rows(shard_labels.astype(np.int64)))
    relevant = relevant_counts(query_labels, gallery_labels, self_retrieval)
    index = ShardIndex(shard, shard_ids, metric, device)
    k, reason = required_k(ks, metrics, int(relevant.max(initial=0)), len(gallery_ids) - int(self_retrieval))
    k = cap_k(k, reason, index.on_gpu, self_retrieval)
    label_of = LabelLookup(gallery_ids, gallery_labels)
    accumulator = MetricAccumulator(ks, [m for m in metrics if m != NMI])
    for start, top in iter_sharded_topk(queries, query_ids, index, k, self_retrieval=self_retrieval,
                                        memory_budget_mb=memory_budget_mb, comm=comm):
        stop = start + len(top.ids)
        accumulator.add(label_of(top.ids) == query_labels[start:stop, None], relevant[start:stop])
    result = accumulator.result()
    if NMI in metrics:
        result["nmi"] = comm.broadcast_object(kmeans_nmi(queries, query_labels) if comm.rank == 0 else None)
    return result


def _as_matrix(x: torch.Tensor | np.ndarray, name: str, metric: str) -> np.ndarray:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().float()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (n, dim) array, got shape {tuple(t.shape)}")
    return (F.normalize(t, dim=1) if metric == "cosine" else t).numpy()


def _as_labels(x: torch.Tensor | np.ndarray, n: int, name: str) -> np.ndarray:
    labels = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64)
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {labels.shape}")
    return labels


def retrieval_metrics(query: torch.Tensor | np.ndarray, query_labels: torch.Tensor | np.ndarray,
                      gallery: torch.Tensor | np.ndarray | None = None,
                      gallery_labels: torch.Tensor | np.ndarray | None = None,
                      ks: Sequence[int] = DEFAULT_KS, metrics: Sequence[str] = DEFAULT_METRICS,
                      metric: str = "cosine", memory_budget_mb: float = 1024) -> dict[str, float]:
    """Recall@K, MAP@R, R-Precision (and NMI if asked) of saved embeddings, in one process, in percent.

    `gallery=None` means self-retrieval (each query searched among the others, itself excluded by
    index). Keys: `recall@K` for each K, `map@r`, `r_precision`, `nmi`, `num_queries`,
    `excluded_queries` (queries with no relevant reference; they are left out of every mean).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
    q = _as_matrix(query, "query", metric)
    q_labels = _as_labels(query_labels, len(q), "query_labels")
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("gallery and gallery_labels must be given together")
    self_retrieval = gallery is None
    g = q if self_retrieval else _as_matrix(gallery, "gallery", metric)
    g_labels = q_labels if self_retrieval else _as_labels(gallery_labels, len(g), "gallery_labels")
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    return sharded_retrieval_metrics(q, q_labels, np.arange(len(q)), g, g_labels, np.arange(len(g)),
                                     self_retrieval=self_retrieval, ks=ks, metrics=metrics, metric=metric,
                                     memory_budget_mb=memory_budget_mb, device="cpu",
                                     comm=Collectives(distributed=False))
