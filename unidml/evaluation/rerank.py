"""Re-ranking after the exact k-NN (docs/design.md, "Re-ranking"): k-reciprocal encoding, alpha query
expansion and database-side augmentation, built on the sharded exact search.

Every method starts from exact top-k lists (`knn.iter_sharded_topk`: float64 scores, ties by the smaller
id, the same for any shard count) and computes what follows from them with float64 operations in a
fixed order, the same on every rank; so the re-ranked lists are the same for any shard count. No
query x gallery matrix is formed: memory grows with the lists (k per row), not with the gallery squared.
Across machines the lists are the same too, except where numpy's `exp` (k-reciprocal weights) or `pow`
(a non-integer alpha) differs in the last bit between CPU vector widths; that can only swap two
candidates whose re-ranked distances agree to about 1e-16.

The averaging methods need the gallery vectors of the neighbours they average on every rank: in
self-retrieval these are the queries (every rank holds them), for a query/gallery pair the gallery is
all-gathered once (n x d float32, like the queries).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from unidml.config import RerankConfig
from unidml.evaluation.distributed import Collectives
from unidml.evaluation.knn import ShardIndex, TopK, iter_sharded_topk, pad
from unidml.evaluation.scoring import NORM_EPS, exact_scores, pairwise_sum, row_norms

SPARSE_ENTRY_BYTES = 12  # one stored entry of a CSR row: float64 value, int32 column
NO_RERANK = RerankConfig()
PARAMETERS: dict[str, tuple[str, ...]] = {  # the keys of `eval.rerank` each method reads
    "none": (), "k_reciprocal": ("k1", "k2", "lambda_value", "candidates"),
    "query_expansion": ("top_n", "alpha"), "database_augmentation": ("top_n", "alpha")}


def rerank_settings(section: Any) -> RerankConfig:
    """A run config's `eval.rerank` section as the evaluation takes it."""
    return RerankConfig(**OmegaConf.to_container(section))


def describe(rerank: RerankConfig) -> dict[str, object]:
    """The re-ranking as a metrics record states it: its name and the parameters it reads."""
    return {"name": rerank.name, **{key: getattr(rerank, key) for key in PARAMETERS[rerank.name]}}


@dataclass(frozen=True)
class Gallery:
    """Every gallery vector, on every rank, sorted by global id."""

    ids: np.ndarray
    vectors: np.ndarray

    @classmethod
    def gather(cls, queries: np.ndarray, query_ids: np.ndarray, shard: np.ndarray, shard_ids: np.ndarray, *,
               self_retrieval: bool, comm: Collectives) -> Gallery:
        """The whole gallery: the queries in self-retrieval, else every rank's shard."""
        if self_retrieval:
            vectors, ids = queries, query_ids
        else:
            vectors = np.concatenate(comm.all_gather_rows(np.ascontiguousarray(shard, np.float32)))
            ids = np.concatenate(comm.all_gather_rows(np.asarray(shard_ids, np.int64)))
        order = np.argsort(ids, kind="stable")
        return cls(np.asarray(ids, np.int64)[order], np.ascontiguousarray(vectors[order], np.float32))

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row of each global id (ids must be in the gallery or -1; -1 gives row 0, to be masked)."""
        return np.where(ids >= 0, np.searchsorted(self.ids, ids), 0)


def power(x: np.ndarray, alpha: float) -> np.ndarray:
    """x ** alpha for x >= 0; a whole alpha by repeated multiplication (exact IEEE products, the same on
    every CPU), any other through numpy's pow. 0 ** 0 = 1."""
    if not float(alpha).is_integer():
        return np.power(x, alpha)
    out, base, e = np.ones_like(x), x.copy(), int(alpha)
    while e:
        if e & 1:
            out = out * base
        base, e = base * base, e >> 1
    return out


def weighted_mean(own: np.ndarray, neighbours: TopK, gallery: Gallery, alpha: float) -> np.ndarray:
    """Rows own_i + sum_j max(s_ij, 0)^alpha x_j over the listed neighbours j (in list order, float64),
    L2-normalised and rounded once to float32: alpha-QE / alpha-DBA of Radenovic et al. (TPAMI 2018)."""
    weights = np.where(neighbours.ids >= 0, power(np.maximum(neighbours.scores, 0.0), alpha), 0.0)
    total = own.astype(np.float64)
    for j in range(neighbours.ids.shape[1]):
        total += weights[:, j, None] * gallery.vectors[gallery.positions(neighbours.ids[:, j])]
    return (total / np.maximum(row_norms(total), NORM_EPS)[:, None]).astype(np.float32)


def distances(scores: np.ndarray, metric: str) -> np.ndarray:
    """Squared Euclidean distance from a score: 2 - 2s between unit vectors (cosine), -s for Euclidean."""
    return 2.0 - 2.0 * scores if metric == "cosine" else -scores


@dataclass
class Search:
    """The search the metrics come from: its queries (expanded by QE), its index (over the gallery DBA
    augmented), how many neighbours to fetch and how to re-order each block of them (k-reciprocal)."""

    queries: np.ndarray
    query_ids: np.ndarray
    index: ShardIndex
    k: int
    self_retrieval: bool
    memory_budget_mb: float
    comm: Collectives
    fetch: int
    reorder: Callable[[int, TopK], TopK] | None = None

    def blocks(self) -> Iterator[tuple[int, TopK]]:
        """(first row, top-k after re-ranking) per block of queries; every rank must call it alike."""
        for start, top in iter_sharded_topk(self.queries, self.query_ids, self.index, self.fetch,
                                            self_retrieval=self.self_retrieval, memory_budget_mb=self.memory_budget_mb,
                                            comm=self.comm):
            if self.reorder is not None:
                top = self.reorder(start, top)
            yield start, pad(top, self.k)


def rerank_search(rerank: RerankConfig, queries: np.ndarray, query_ids: np.ndarray, shard: np.ndarray,
                  shard_ids: np.ndarray, index: ShardIndex, k: int, *, references: int, self_retrieval: bool,
                  metric: str, memory_budget_mb: float, device: torch.device | str, comm: Collectives) -> Search:
    """The search for top-k lists re-ranked by `rerank` (`index` holds this rank's `shard`); every rank
    must call it alike. `references`: what a query can retrieve (the gallery, less itself in self-retrieval)."""
    search = Search(queries, query_ids, index, k, self_retrieval, memory_budget_mb, comm, fetch=k)
    if rerank.name == "none":
        return search
    if rerank.name in ("query_expansion", "database_augmentation") and metric != "cosine":
        raise ValueError(f"eval.rerank.name={rerank.name} needs the cosine metric, got '{metric}'")
    gallery = Gallery.gather(queries, query_ids, shard, shard_ids, self_retrieval=self_retrieval, comm=comm)
    top_n = min(int(rerank.top_n), len(gallery.ids) - 1 if self_retrieval else len(gallery.ids))
    if rerank.name == "query_expansion":
        search.queries = expand_queries(queries, query_ids, index, gallery, top_n, float(rerank.alpha),
                                        self_retrieval=self_retrieval, memory_budget_mb=memory_budget_mb, comm=comm)
    elif rerank.name == "database_augmentation":
        augmented = augment_database(shard_ids, gallery, index, top_n, float(rerank.alpha),
                                     memory_budget_mb=memory_budget_mb, comm=comm)
        search.index = ShardIndex(augmented, shard_ids, metric, device)
    elif rerank.name == "k_reciprocal":
        search.fetch = min(max(k, int(rerank.candidates)), references)
        search.reorder = KReciprocal(rerank, queries, query_ids, shard_ids, gallery, self_retrieval=self_retrieval,
                                     metric=metric, memory_budget_mb=memory_budget_mb, device=device, comm=comm)
    else:
        raise ValueError(f"unknown re-ranking '{rerank.name}'")
    return search


def expand_queries(queries: np.ndarray, query_ids: np.ndarray, index: ShardIndex, gallery: Gallery, top_n: int,
                   alpha: float, *, self_retrieval: bool, memory_budget_mb: float, comm: Collectives) -> np.ndarray:
    """alpha-QE: each query replaced by the weighted mean of itself and its top-n gallery neighbours."""
    out = np.empty_like(queries)
    for start, top in iter_sharded_topk(queries, query_ids, index, top_n, self_retrieval=self_retrieval,
                                        memory_budget_mb=memory_budget_mb, comm=comm):
        out[start:start + len(top.ids)] = weighted_mean(queries[start:start + len(top.ids)], top, gallery, alpha)
    return out


def augment_database(shard_ids: np.ndarray, gallery: Gallery, index: ShardIndex, top_n: int, alpha: float, *,
                     memory_budget_mb: float, comm: Collectives) -> np.ndarray:
    """alpha-DBA of this rank's shard: each gallery vector replaced by the weighted mean of itself and its
    top-n other gallery vectors (itself excluded by index, as in self-retrieval)."""
    rows = gallery.positions(np.asarray(shard_ids, np.int64))
    out = np.empty((len(rows), gallery.vectors.shape[1]), np.float32)
    for start, top in iter_sharded_topk(gallery.vectors, gallery.ids, index, top_n, self_retrieval=True,
                                        memory_budget_mb=memory_budget_mb, comm=comm):
        mine = np.flatnonzero((rows >= start) & (rows < start + len(top.ids)))
        block = rows[mine] - start
        out[mine] = weighted_mean(gallery.vectors[rows[mine]], TopK(top.scores[block], top.ids[block]), gallery,
                                  alpha)
    return out


def reciprocal_sets(lists: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    """R(i, k) of `rows`: the members j of i's k+1 nearest (itself included) that have i among theirs;
    (len(rows), k+1) ids in list order, -1 where not reciprocal."""
    forward = lists[rows, :k + 1]
    backward = lists[np.maximum(forward, 0), :k + 1]
    keep = (forward >= 0) & (backward == rows[:, None, None]).any(2)
    return np.where(keep, forward, -1)


def sorted_sets(members: np.ndarray) -> np.ndarray:
    """Each row's distinct ids >= 0, ascending, right-aligned after -1 padding, as narrow as the widest row."""
    s = np.sort(members, 1)
    s[:, 1:][s[:, 1:] == s[:, :-1]] = -1
    s = np.sort(s, 1)
    width = int((s >= 0).sum(1).max(initial=0))
    return s[:, s.shape[1] - width:]


class KReciprocal:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), on sparse neighbour lists.

    Over the universe U (the gallery, plus the queries for a query/gallery pair), as in the authors' code:
    R(i, k1) the k-reciprocal set, expanded by R(c, round(k1/2)) of each member c sharing more than 2/3 of
    it; V_i = exp(-d_ij) / sum over that set (d: squared distance); local query expansion V_i <- mean of
    V_j over i's k2 nearest; Jaccard distance J = 1 - m / (2 - m), m = sum_l min(V_il, V_jl); final
    distance (1 - lambda) J + lambda d. Only k1 + 1 neighbours per point are kept (sparse V, k-bounded).

    Two differences from the authors' dense code, stated in docs/design.md: distances are not divided by
    each point's largest distance (that needs every pair; d is used on its own scale, 0 to 4 between unit
    vectors), and each query re-orders only its top `candidates` neighbours (a gallery item further away
    that the expansion would pull in stays out); within the candidates the order is the exact dense one.
    """

    def __init__(self, rerank: RerankConfig, queries: np.ndarray, query_ids: np.ndarray, shard_ids: np.ndarray,
                 gallery: Gallery, *, self_retrieval: bool, metric: str, memory_budget_mb: float,
                 device: torch.device | str, comm: Collectives) -> None:
        self.metric, self.gallery, self.lam = metric, gallery, float(rerank.lambda_value)
        self.budget_bytes = int(memory_budget_mb * 2**20)
        if self_retrieval:
            universe, self.query_rows = gallery.vectors, gallery.positions(np.asarray(query_ids, np.int64))
        else:
            universe = np.concatenate([gallery.vectors, queries])
            self.query_rows = len(gallery.ids) + np.arange(len(queries))
        mine = gallery.positions(np.asarray(shard_ids, np.int64))
        if not self_retrieval:
            mine = np.concatenate([mine, np.array_split(self.query_rows, comm.world_size)[comm.rank]])
        index = ShardIndex(universe[mine], mine, metric, device)
        n = len(universe)
        width = min(int(rerank.k1) + 1, n)
        lists = np.concatenate([top.ids for _, top in iter_sharded_topk(
            universe, np.arange(n), index, width, self_retrieval=False, memory_budget_mb=memory_budget_mb,
            comm=comm)] or [np.zeros((0, width), np.int64)])
        v = self._encode(universe, lists, int(rerank.k1))
        k2 = min(int(rerank.k2), width)
        if k2 > 1:
            pick = sp.csr_matrix((np.ones(n * k2), lists[:, :k2].ravel(), np.arange(0, n * k2 + 1, k2)), shape=(n, n))
            v = pick @ v
            v.sort_indices()
            v.data /= k2
        self.v = v.tocsr()

    def _encode(self, universe: np.ndarray, lists: np.ndarray, k1: int) -> sp.csr_matrix:
        """Sparse V: row i holds exp(-d_ij), normalised to sum 1, over i's expanded k-reciprocal set."""
        n = len(universe)
        half = int(np.around(k1 / 2.0))
        rows_per_block = max(1, self.budget_bytes // (8 * 8 * (k1 + 1) ** 2 * (half + 2)))
        indptr, indices, data = [np.zeros(1, np.int64)], [], []
        for start in range(0, n, rows_per_block):
            rows = np.arange(start, min(n, start + rows_per_block))
            own = reciprocal_sets(lists, k1, rows)
            cand = np.maximum(own, 0)
            halves = reciprocal_sets(lists, half, cand.ravel()).reshape(len(rows), own.shape[1], -1)
            halves = np.where((own >= 0)[..., None], halves, -1)
            shared = ((halves[..., None] == own[:, None, None, :]) & (halves >= 0)[..., None]).any(3).sum(2)
            accepted = 3 * shared > 2 * (halves >= 0).sum(2)  # more than 2/3 of R(c, k1/2) lies in R(i, k1)
            members = sorted_sets(np.concatenate(
                [own, np.where(accepted[..., None], halves, -1).reshape(len(rows), -1)], 1))
            valid = members >= 0
            d = distances(exact_scores(universe[rows], universe, np.maximum(members, 0), self.metric), self.metric)
            weight = np.where(valid, np.exp(-d), 0.0)
            weight /= pairwise_sum(weight.copy())[:, None]
            indptr.append(indptr[-1][-1] + np.cumsum(valid.sum(1)))
            indices.append(members[valid])
            data.append(weight[valid])
        return sp.csr_matrix((np.concatenate(data or [np.zeros(0)]), np.concatenate(indices or [np.zeros(0, int)]),
                              np.concatenate(indptr)), shape=(n, n))

    def __call__(self, start: int, top: TopK) -> TopK:
        """A block's candidate lists (queries start, start+1, ...) re-ordered by the final distance;
        scores become minus that distance, missing candidates stay last."""
        n, m = top.ids.shape
        valid = top.ids >= 0
        cand = np.where(valid, self.gallery.positions(top.ids), 0).ravel()
        owner = np.repeat(self.query_rows[start:start + n], m)
        widest = int(np.diff(self.v.indptr).max(initial=1))
        chunk = max(1, self.budget_bytes // (4 * SPARSE_ENTRY_BYTES * max(widest, 1)))
        overlap = np.empty(n * m)
        for c0 in range(0, n * m, chunk):
            a, b = self.v[owner[c0:c0 + chunk]], self.v[cand[c0:c0 + chunk]]
            overlap[c0:c0 + chunk] = np.asarray(a.minimum(b).sum(1)).ravel()
        jaccard = 1.0 - overlap / (2.0 - overlap)
        original = distances(np.where(valid, top.scores, 0.0), self.metric)
        final = (1.0 - self.lam) * jaccard.reshape(n, m) + self.lam * original
        final = np.where(valid, final, np.inf)
        key_ids = np.where(valid, top.ids, np.iinfo(np.int64).max)
        order = np.lexsort((key_ids, final), axis=1)
        return TopK(np.take_along_axis(-final, order, 1), np.take_along_axis(top.ids, order, 1))
