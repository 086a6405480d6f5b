"""Retrieval metrics from exact neighbour lists and ranks (docs/design.md, "Evaluation"), accumulated block by block.

The ranking of a query is the gallery sorted by (exact score descending, gallery index ascending),
the query itself excluded by index. With R the number of references sharing the query's label:

- Recall@K (`recall`): 1 if any of the top K shares the query's label.
- R-Precision (`r_precision`): hits in the top R, over R. MAP@R (`map_at_r`): (1/R) sum_{i<=R} P(i) rel(i).
- Full-ranking mean average precision (`map`): (1/R) sum over the R relevant items of P(their rank);
  mean reciprocal rank (`mrr`): 1 / rank of the first relevant item. These two need the rank of every
  relevant item in the whole gallery, not only the top k.
- NMI (`nmi`): labels against a k-means clustering of the queries.

Queries with no relevant reference (R = 0) are excluded from every mean and counted in
`excluded_queries`; `num_queries` is the number of queries before exclusion. With no query left the
means are NaN. Two styles of result (`to_style`): "percent" (the default) gives percentages 0-100
under the keys recall@K, map@r, r_precision, map, mrr, nmi plus the two counts; "pml" gives
pytorch-metric-learning AccuracyCalculator's keys and fractions 0-1 (precision_at_1,
mean_average_precision_at_r, r_precision, mean_average_precision, mean_reciprocal_rank, NMI), whose
lone queries are our excluded ones.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from unidml.errors import EvaluationError

RECALL, MAP_AT_R, R_PRECISION, MAP, MRR, NMI = "recall", "map_at_r", "r_precision", "map", "mrr", "nmi"
KNOWN_METRICS = (RECALL, MAP_AT_R, R_PRECISION, MAP, MRR, NMI)
RANK_METRICS = (MAP, MRR)  # need every relevant item's rank in the whole gallery
STYLES = ("percent", "pml")
PML_KEYS = {"recall@1": "precision_at_1", "map@r": "mean_average_precision_at_r", "r_precision": "r_precision",
            "map": "mean_average_precision", "mrr": "mean_reciprocal_rank", "nmi": "NMI"}
UNRANKED = np.iinfo(np.int64).max  # rank of a padding slot / position of "no hit"


def check_request(ks: Sequence[int], metrics: Sequence[str], style: str = "percent") -> None:
    """Reject unknown metric names or styles and non-positive K with a one-line message."""
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(KNOWN_METRICS)}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got '{style}'")
    if RECALL in metrics and (not ks or min(int(k) for k in ks) <= 0):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}")


def check_gallery_size(ks: Sequence[int], metrics: Sequence[str], references: int, self_retrieval: bool) -> None:
    """Refuse Recall@K for K above the references a query has (it would be 100 for every query)."""
    if RECALL in metrics and max(ks) > references:
        besides = " besides the query itself" if self_retrieval else ""
        raise EvaluationError(f"eval.ks: Recall@{max(ks)} needs {max(ks)} references per query, but the gallery "
                              f"holds {references}{besides}; use eval.ks no larger than {references}")


def required_k(ks: Sequence[int], metrics: Sequence[str], max_relevant: int, gallery_size: int) -> int:
    """Neighbours each query needs: max K for Recall@K, the largest R for MAP@R / R-Precision;
    never more than the gallery holds."""
    wanted = [0]
    if RECALL in metrics:
        wanted.append(max(ks))
    if MAP_AT_R in metrics or R_PRECISION in metrics:
        wanted.append(max_relevant)
    return min(max(wanted), gallery_size)


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, self_retrieval: bool) -> np.ndarray:
    """R for every query: gallery items sharing its label (itself excluded in self-retrieval)."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.clip(np.searchsorted(classes, query_labels), 0, max(len(classes) - 1, 0))
    found = (classes[pos] == query_labels) if len(classes) else np.zeros(len(query_labels), bool)
    r = np.where(found, counts[pos] if len(classes) else 0, 0)
    return (r - int(self_retrieval)).astype(np.int64)


class MetricAccumulator:
    """Collects per-query metric values over blocks of queries; `result()` gives the means in percent,
    from correctly rounded sums (`math.fsum`), so the values do not depend on the block size."""

    def __init__(self, ks: Sequence[int], metrics: Sequence[str]) -> None:
        check_request(ks, metrics)
        self.ks = sorted({int(k) for k in ks}) if RECALL in metrics else []
        self.metrics = tuple(m for m in KNOWN_METRICS if m in metrics and m != NMI)
        self.values: dict[str, list[np.ndarray]] = {}
        self.num_queries = 0
        self.excluded = 0

    def add(self, matches: np.ndarray, relevant: np.ndarray, ranks: np.ndarray | None = None) -> None:
        """`matches` (n, k) bool: neighbour j of query i shares its label; `relevant` (n,) R per query;
        `ranks` (n, w), needed for `map`/`mrr`: each row the 1-based ranks of the query's relevant
        items in ascending order, padded with UNRANKED."""
        self.num_queries += len(relevant)
        keep = relevant > 0
        self.excluded += int((~keep).sum())
        values = per_query_metrics(matches[keep], relevant[keep], self.ks, self.metrics)
        if ranks is not None:
            values |= per_query_rank_metrics(ranks[keep], relevant[keep], self.metrics)
        for name, value in values.items():
            self.values.setdefault(name, []).append(value)

    def result(self) -> dict[str, float]:
        counted = self.num_queries - self.excluded
        names = [f"recall@{k}" for k in self.ks]
        names += [{MAP_AT_R: "map@r"}.get(m, m) for m in self.metrics if m != RECALL]
        out = {n: (100.0 * math.fsum(np.concatenate(self.values.get(n, [np.zeros(0)]))) / counted if counted
                   else float("nan")) for n in names}
        out["num_queries"] = self.num_queries
        out["excluded_queries"] = self.excluded
        return out


def per_query_metrics(matches: np.ndarray, relevant: np.ndarray, ks: Sequence[int],
                      metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-query Recall@K (0/1), AP@R and R-Precision (fractions) for queries with R > 0.

    `matches` must hold at least max(ks) and max(R) columns (`required_k`): a query without a hit in
    them misses at every K (a hit is never assumed beyond the retrieved columns).
    """
    out: dict[str, np.ndarray] = {}
    k = matches.shape[1]
    if RECALL in metrics:
        first_hit = np.where(matches.any(1), matches.argmax(1), UNRANKED)  # 0-based rank of the first relevant
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


def per_query_rank_metrics(ranks: np.ndarray, relevant: np.ndarray, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-query full-ranking AP and reciprocal rank from the ascending ranks of the relevant items."""
    out: dict[str, np.ndarray] = {}
    if MAP in metrics:
        t = np.arange(1, ranks.shape[1] + 1)[None, :]
        present = t <= relevant[:, None]
        out["map"] = np.where(present, t / np.where(present, ranks, 1), 0.0).sum(1) / relevant
    if MRR in metrics:
        out["mrr"] = 1.0 / ranks[:, 0]
    return out


def to_style(result: dict[str, float], style: str) -> dict[str, float]:
    """`result` (percent style) as asked: unchanged, or PML's keys and fractions (counts dropped)."""
    if style == "percent":
        return result
    return {PML_KEYS[key]: value / 100.0 for key, value in result.items() if key in PML_KEYS}


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
