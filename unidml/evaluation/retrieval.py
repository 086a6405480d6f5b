"""Retrieval evaluation: sharded exact k-NN (one FAISS shard per rank, exact merge) feeding the metrics.

Every rank holds all queries and its own shard of the gallery; queries are searched in blocks sized to
`memory_budget_mb`, so no query x gallery matrix is ever formed. Each rank re-scores its own
candidates exactly (`scoring.exact_scores`), so merging the per-rank lists by (score, global id) gives
the same ids as one process, for any shard count. Rows to leave out (unreadable images, say) are simply
not passed: global ids need not be contiguous, and a left-out row is neither a query nor a reference.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from unidml.config import RerankConfig
from unidml.errors import EvaluationError
from unidml.evaluation.distributed import Collectives
from unidml.evaluation.knn import METRICS, ShardIndex, TopK, merge_topk
from unidml.evaluation.metrics import (
    NMI,
    RANK_METRICS,
    UNRANKED,
    MetricAccumulator,
    check_gallery_size,
    check_request,
    kmeans_nmi,
    relevant_counts,
    required_k,
    to_style,
)
from unidml.evaluation.rerank import NO_RERANK, rerank_search
from unidml.evaluation.scoring import l2_normalize

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


def check_finite(vectors: np.ndarray, name: str, comm: Collectives, sharded: bool) -> None:
    """Stop with one line when embedding rows are non-finite: a diverged model is reported, not scored.
    With `sharded`, `vectors` is this rank's part and the count covers every rank (all raise alike)."""
    counts = np.array([int((~np.isfinite(vectors)).any(1).sum()) if vectors.size else 0, len(vectors)], np.int64)
    if sharded:
        counts = np.sum(comm.all_gather_equal(counts), axis=0)
    if counts[0]:
        raise EvaluationError(f"evaluation: {counts[0]} of {counts[1]} rows of {name} embeddings are "
                              f"non-finite (diverged model?)")


def _same_label_positions(shard_labels: np.ndarray, query_labels: np.ndarray, width: int, index: ShardIndex,
                          exclude_ids: np.ndarray | None) -> np.ndarray:
    """(n, width) local shard positions of the references sharing each query's label (-1 pads), the
    query's own id left out."""
    order = np.argsort(shard_labels, kind="stable")
    sorted_labels = shard_labels[order]
    first = np.searchsorted(sorted_labels, query_labels, side="left")
    last = np.searchsorted(sorted_labels, query_labels, side="right")
    n = len(query_labels)
    if len(order) == 0:
        return np.full((n, width), -1, np.int64)
    own = index.local_positions(exclude_ids) if exclude_ids is not None else np.full(n, -1)
    # Candidates: each query's label run in `order` (one column more than kept, for the one dropped).
    j = np.arange(width + 1)[None, :]
    valid = j < (last - first)[:, None]
    members = np.where(valid, order[np.minimum(first[:, None] + j, len(order) - 1)], -1)
    is_own = valid & (members == own[:, None]) & (own[:, None] >= 0)
    dropped = np.where(is_own.any(1), is_own.argmax(1), width + 1)  # a position occurs at most once
    kept = np.arange(width)[None, :]
    return np.take_along_axis(members, kept + (kept >= dropped[:, None]), 1)


def relevant_ranks(queries: np.ndarray, query_ids: np.ndarray, query_labels: np.ndarray, index: ShardIndex,
                   shard_labels: np.ndarray, width: int, *, self_retrieval: bool, memory_budget_mb: float,
                   comm: Collectives) -> np.ndarray:
    """(n, width) 1-based ranks, ascending, of each query's relevant references in the whole sharded
    gallery (padded with UNRANKED); every rank must call it alike.

    Each rank scores its own relevant references exactly; the all-gathered (score, id) pairs are the
    thresholds; each rank counts its references ranked above each threshold; the counts are summed.
    """
    exclude = query_ids if self_retrieval else None
    mine = index.scores_at(queries, _same_label_positions(shard_labels, query_labels, width, index, exclude))
    parts = [TopK(s, i) for s, i in zip(comm.all_gather_equal(mine.scores), comm.all_gather_equal(mine.ids))]
    thresholds = merge_topk(parts, width)
    counts = index.count_above(queries, thresholds, exclude, int(memory_budget_mb * 2**20))
    total = np.sum(comm.all_gather_equal(counts), axis=0)
    return np.where(thresholds.ids >= 0, total + 1, UNRANKED)


def sharded_knn(queries: np.ndarray, query_ids: np.ndarray, shard: np.ndarray, shard_ids: np.ndarray, k: int, *,
                self_retrieval: bool, metric: str = "cosine", memory_budget_mb: float = 1024,
                device: torch.device | str = "cpu", comm: Collectives | None = None,
                rerank: RerankConfig = NO_RERANK) -> TopK:
    """Exact top-k neighbours (global ids, ties by smaller id, float64 scores) of all queries over the
    sharded gallery; the same ids for any shard count, block size and hardware. With `rerank`, the
    lists after that re-ranking (`evaluation.rerank`; k-reciprocal scores are minus its final distance)."""
    comm = comm or Collectives(distributed=False)
    check_finite(queries, "the query", comm, sharded=False)
    check_finite(shard, "the gallery", comm, sharded=True)
    index = ShardIndex(shard, shard_ids, metric, device)
    references = int(np.sum(comm.all_gather_equal(np.array([len(shard_ids)], np.int64)))) - int(self_retrieval)
    search = rerank_search(rerank, queries, query_ids, shard, shard_ids, index, k, references=references,
                           self_retrieval=self_retrieval, metric=metric, memory_budget_mb=memory_budget_mb,
                           device=device, comm=comm)
    blocks = [top for _, top in search.blocks()]
    if not blocks:
        return TopK(np.zeros((0, k), np.float64), np.zeros((0, k), np.int64))
    return TopK(np.concatenate([b.scores for b in blocks]), np.concatenate([b.ids for b in blocks]))


def sharded_retrieval_metrics(queries: np.ndarray, query_labels: np.ndarray, query_ids: np.ndarray,
                              shard: np.ndarray, shard_labels: np.ndarray, shard_ids: np.ndarray, *,
                              self_retrieval: bool, ks: Sequence[int], metrics: Sequence[str],
                              metric: str, memory_budget_mb: float, device: torch.device | str,
                              comm: Collectives, style: str = "percent",
                              names: tuple[str, str] = ("the query", "the gallery"),
                              rerank: RerankConfig = NO_RERANK) -> dict[str, float]:
    """Metrics of all queries (held by every rank) against the gallery spread over the ranks.

    In self-retrieval the query and gallery index spaces are the same and a query's own index is
    excluded from its neighbours. Vectors are used as given (cosine expects L2-normalised rows).
    Non-finite rows, or Recall@K with K above the references a query has, stop with an
    `EvaluationError` (one line; `names` name the two sets in it, e.g. "split 'test'").
    `style`: see `metrics.to_style`. `rerank`: the re-ranking the top-k lists get (`evaluation.rerank`;
    k_reciprocal re-orders only the top candidates, so it refuses the full-ranking `map` and `mrr`).
    The returned dict is the same on every rank.
    """
    check_request(ks, metrics, style)
    if rerank.name == "k_reciprocal" and any(m in RANK_METRICS for m in metrics):
        raise ValueError("map and mrr rank the whole gallery; k_reciprocal re-orders only each query's top "
                         "candidates (leave them out)")
    if style == "pml":
        ks = (1,)  # PML reports Recall@1 only, as precision_at_1
    check_finite(queries, names[0], comm, sharded=False)
    if not self_retrieval:
        check_finite(shard, names[1], comm, sharded=True)
    gallery_ids = np.concatenate(comm.all_gather_rows(shard_ids.astype(np.int64)))
    gallery_labels = np.concatenate(comm.all_gather_rows(shard_labels.astype(np.int64)))
    references = len(gallery_ids) - int(self_retrieval)
    check_gallery_size(ks, metrics, references, self_retrieval)
    relevant = relevant_counts(query_labels, gallery_labels, self_retrieval)
    width = int(relevant.max(initial=0))
    index = ShardIndex(shard, shard_ids, metric, device)
    k = required_k(ks, metrics, width, references)
    label_of = LabelLookup(gallery_ids, gallery_labels)
    accumulator = MetricAccumulator(ks, metrics)
    search = rerank_search(rerank, queries, query_ids, shard, shard_ids, index, k, references=references,
                           self_retrieval=self_retrieval, metric=metric, memory_budget_mb=memory_budget_mb,
                           device=device, comm=comm)
    for start, top in search.blocks():
        stop = start + len(top.ids)
        ranks = None
        if any(m in RANK_METRICS for m in metrics):
            ranks = relevant_ranks(search.queries[start:stop], query_ids[start:stop], query_labels[start:stop],
                                   search.index, shard_labels, width, self_retrieval=self_retrieval,
                                   memory_budget_mb=memory_budget_mb, comm=comm)
        accumulator.add(label_of(top.ids) == query_labels[start:stop, None], relevant[start:stop], ranks)
    result = accumulator.result()
    if NMI in metrics:
        result["nmi"] = comm.broadcast_object(kmeans_nmi(queries, query_labels) if comm.rank == 0 else None)
    return to_style(result, style)


def _as_matrix(x: torch.Tensor | np.ndarray, name: str, metric: str) -> np.ndarray:
    a = (x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32))
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (n, dim) array, got shape {tuple(a.shape)}")
    return l2_normalize(a) if metric == "cosine" else np.ascontiguousarray(a)


def _as_labels(x: torch.Tensor | np.ndarray, n: int, name: str) -> np.ndarray:
    labels = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64)
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {labels.shape}")
    return labels


def _valid_rows(mask: np.ndarray | torch.Tensor | None, n: int, name: str) -> np.ndarray:
    if mask is None:
        return np.arange(n)
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if mask.dtype != bool or mask.shape != (n,):
        raise ValueError(f"{name} must be a boolean array of shape ({n},), got {mask.dtype} {mask.shape}")
    return np.flatnonzero(mask)


def retrieval_metrics(query: torch.Tensor | np.ndarray, query_labels: torch.Tensor | np.ndarray,
                      gallery: torch.Tensor | np.ndarray | None = None,
                      gallery_labels: torch.Tensor | np.ndarray | None = None,
                      ks: Sequence[int] = DEFAULT_KS, metrics: Sequence[str] = DEFAULT_METRICS,
                      metric: str = "cosine", memory_budget_mb: float = 1024, *, style: str = "percent",
                      query_valid: np.ndarray | torch.Tensor | None = None,
                      gallery_valid: np.ndarray | torch.Tensor | None = None,
                      rerank: RerankConfig = NO_RERANK) -> dict[str, float]:
    """Recall@K, MAP@R, R-Precision (and `map`, `mrr`, `nmi` if asked) of saved embeddings, in one process.

    `gallery=None` means self-retrieval (each query searched among the others, itself excluded by
    index). Inputs: with `metric="cosine"` every row is L2-normalised here (in float64, rounded once to
    float32), so raw embeddings give their cosine similarity; with `"euclidean"` rows are used as given.
    The ranking is exact and hardware-independent (ties by smaller index, see `knn`).

    `style="percent"` (default): percentages under `recall@K` for each K, `map@r`, `r_precision`,
    `map`, `mrr`, `nmi`, plus `num_queries` and `excluded_queries` (queries with no relevant reference,
    left out of every mean). `style="pml"`: pytorch-metric-learning AccuracyCalculator's keys and
    fractions (`precision_at_1`, `mean_average_precision_at_r`, `r_precision`, `mean_average_precision`,
    `mean_reciprocal_rank`, `NMI`); `ks` is not used then. Note that AccuracyCalculator's default
    k-NN ranks by Euclidean distance on its inputs as given: on unnormalised embeddings use
    `metric="euclidean"` to reproduce it (on L2-normalised ones both metrics rank alike). `NMI` comes
    from our own k-means (`metrics.kmeans_nmi`), so it is close to, not equal to, PML's.

    `query_valid` / `gallery_valid`: optional boolean masks; rows marked False (unreadable images, say)
    are left out entirely, neither queries nor references (in self-retrieval `query_valid` covers both).
    Non-finite rows that are not masked out stop with an `EvaluationError`, as does Recall@K with K
    larger than the references a query has. `rerank` re-ranks every query's neighbours first
    (`evaluation.rerank`, e.g. `RerankConfig(name="k_reciprocal")`).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
    q = _as_matrix(query, "query", metric)
    q_labels = _as_labels(query_labels, len(q), "query_labels")
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("gallery and gallery_labels must be given together")
    self_retrieval = gallery is None
    if self_retrieval and gallery_valid is not None:
        raise ValueError("gallery_valid needs a gallery; in self-retrieval query_valid covers both")
    g = q if self_retrieval else _as_matrix(gallery, "gallery", metric)
    g_labels = q_labels if self_retrieval else _as_labels(gallery_labels, len(g), "gallery_labels")
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    q_rows = _valid_rows(query_valid, len(q), "query_valid")
    g_rows = q_rows if self_retrieval else _valid_rows(gallery_valid, len(g), "gallery_valid")
    return sharded_retrieval_metrics(q[q_rows], q_labels[q_rows], q_rows, g[g_rows], g_labels[g_rows], g_rows,
                                     self_retrieval=self_retrieval, ks=ks, metrics=metrics, metric=metric,
                                     memory_budget_mb=memory_budget_mb, device="cpu",
                                     comm=Collectives(distributed=False), style=style, rerank=rerank)
