"""Retrieval metrics from neighbour lists (DESIGN.md §6), accumulated block by block.

All values are percentages (0-100): Recall@K, MAP@R, R-Precision and NMI. Queries with no relevant
reference (R = 0) are excluded from every mean and counted in `excluded_queries`; `num_queries` is
the number of queries before exclusion. With no query left the means are NaN.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RECALL, MAP_AT_R, R_PRECISION, NMI = "recall", "map_at_r", "r_precision", "nmi"
KNOWN_METRICS = (RECALL, MAP_AT_R, R_PRECISION, NMI)


def check_request(ks: Sequence[int], metrics: Sequence[str]) -> None:
    """Reject unknown metric names and non-positive K with a one-line message."""
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(KNOWN_METRICS)}")
    if RECALL in metrics and (not ks or min(int(k) for k in ks) <= 0):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}")


def required_k(ks: Sequence[int], metrics: Sequence[str], max_relevant: int, gallery_size: int) -> tuple[int, str]:
    """Neighbours each query needs: max K for Recall@K, the largest R for MAP@R / R-Precision;
    never more than the gallery holds. Returns (k, what needs it)."""
    wanted = [(0, "nothing")]
    if RECALL in metrics:
        wanted.append((max(ks), f"Recall@{max(ks)}"))
    if MAP_AT_R in metrics or R_PRECISION in metrics:
        wanted.append((max_relevant, "MAP@R/R-Precision (largest class size)"))
    k, reason = max(wanted)
    return min(k, gallery_size), reason


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, self_retrieval: bool) -> np.ndarray:
    """R for every query: gallery items sharing its label (itself excluded in self-retrieval)."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.clip(np.searchsorted(classes, query_labels), 0, max(len(classes) - 1, 0))
    found = (classes[pos] == query_labels) if len(classes) else np.zeros(len(query_labels), bool)
    r = np.where(found, counts[pos] if len(classes) else 0, 0)
    return (r - int(self_retrieval)).astype(np.int64)


class MetricAccumulator:
    """Sums per-query metric values over blocks of queries; `result()` gives the means in percent."""

    def __init__(self, ks: Sequence[int], metrics: Sequence[str]) -> None:
        check_request(ks, metrics)
        self.ks = sorted({int(k) for k in ks}) if RECALL in metrics else []
        self.metrics = tuple(metrics)
        self.sums: dict[str, float] = {}
        self.num_queries = 0
        self.excluded = 0

    def add(self, matches: np.ndarray, relevant: np.ndarray) -> None:
        """`matches` (n, k) bool: neighbour j of query i shares its label; `relevant` (n,) R per query."""
        self.num_queries += len(relevant)
        keep = relevant > 0
        self.excluded += int((~keep).sum())
        matches, relevant = matches[keep], relevant[keep]
        for name, value in per_query_metrics(matches, relevant, self.ks, self.metrics).items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.sum())

    def result(self) -> dict[str, float]:
        counted = self.num_queries - self.excluded
        names = [f"recall@{k}" for k in self.ks]
        names += [n for m, n in ((MAP_AT_R, "map@r"), (R_PRECISION, "r_precision")) if m in self.metrics]
        out = {n: (100.0 * self.sums.get(n, 0.0) / counted if counted else float("nan")) for n in names}
        out["num_queries"] = self.num_queries
        out["excluded_queries"] = self.excluded
        return out


def per_query_metrics(matches: np.ndarray, relevant: np.ndarray, ks: Sequence[int],
                      metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-query Recall@K (0/1), AP@R and R-Precision (fractions) for queries with R > 0.

    Neighbours beyond the available columns count as not relevant (a capped k gives lower bounds).
    """
    out: dict[str, np.ndarray] = {}
    n, k = matches.shape
    if RECALL in metrics:
        first_hit = np.where(matches.any(1), matches.argmax(1), k)  # 0-based rank of the first relevant
        for K in ks:
            out[f"recall@{K}"] = (first_hit < K).astype(np.float64)
    if MAP_AT_R in metrics or R_PRECISION in metrics:
        ranks = np.arange(1, k + 1)
        rel = matches & (ranks[None, :] <= relevant[:, None])
        if R_PRECISION in metrics:
            out["r_precision"] = rel.sum(1) / relevant
        if MAP_AT_R in metrics:
            precision_at_i = np.cumsum(rel, 1) / ranks[None, :]
            out["map@r"] = (precision_at_i * rel).sum(1) / relevant
    return out


def normalized_mutual_information(labels: np.ndarray, clusters: np.ndarray) -> float:
    """NMI with arithmetic-mean normalisation, I(U;V) / ((H(U) + H(V)) / 2), as a fraction in [0, 1]."""
    _, u = np.unique(labels, return_inverse=True)
    _, v = np.unique(clusters, return_inverse=True)
    n = len(u)
    joint = np.zeros((u.max() + 1, v.max() + 1))
    np.add.at(joint, (u, v), 1.0)
    joint /= n
    pu, pv = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = float((joint[nz] * np.log(joint[nz] / np.outer(pu, pv)[nz])).sum())
    hu = -float((pu * np.log(pu)).sum())
    hv = -float((pv * np.log(pv)).sum())
    if hu == 0.0 and hv == 0.0:
        return 1.0
    return max(0.0, mutual) / ((hu + hv) / 2.0)


def kmeans_nmi(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """NMI (percent) between the labels and a FAISS k-means clustering with one cluster per class
    (20 iterations, best of 3 seeded restarts)."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n_clusters = len(np.unique(labels))
    if len(x) <= n_clusters:  # no fewer clusters than points: every point is its own cluster
        return 100.0 * normalized_mutual_information(labels, np.arange(len(x)))
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=20, nredo=3, seed=seed, verbose=False,
                          min_points_per_centroid=1)
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, 1)
    return 100.0 * normalized_mutual_information(labels, assigned[:, 0])
