"""Plain-torch brute-force oracle for the evaluation tests (and tests of the oracle on hand cases).

The oracle materialises the full query x gallery score matrix, ranks it with a stable sort (ties keep
the smaller gallery index first), excludes a query's own index by masking it, and computes every
metric per query with explicit loops straight from DESIGN.md §6.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def brute_force_scores(query: np.ndarray, gallery: np.ndarray, metric: str) -> torch.Tensor:
    """Higher-is-closer scores: cosine similarity, or negated squared Euclidean distance."""
    q = torch.as_tensor(query, dtype=torch.float32)
    g = torch.as_tensor(gallery, dtype=torch.float32)
    if metric == "cosine":
        return F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    return -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)


def brute_force_topk(query: np.ndarray, gallery: np.ndarray | None, k: int, metric: str = "cosine"):
    """(scores, ids) of the exact top-k, ties by smaller index; gallery None = self-retrieval."""
    scores = brute_force_scores(query, query if gallery is None else gallery, metric)
    if gallery is None:
        scores.fill_diagonal_(float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order).numpy(), order.numpy()


def brute_force_metrics(query, query_labels, gallery=None, gallery_labels=None, ks=(1, 10, 100),
                        metric: str = "cosine") -> dict[str, float]:
    """Recall@K, MAP@R, R-Precision (percent) from the full ranking, one query at a time."""
    self_retrieval = gallery is None
    g_labels = np.asarray(query_labels if self_retrieval else gallery_labels)
    n_gallery = len(g_labels) - int(self_retrieval)
    _, ranking = brute_force_topk(query, gallery, n_gallery, metric)
    sums = {f"recall@{k}": 0.0 for k in ks} | {"map@r": 0.0, "r_precision": 0.0}
    excluded = 0
    for i, label in enumerate(np.asarray(query_labels)):
        relevant = g_labels[ranking[i]] == label
        r = int(relevant.sum())
        if r == 0:
            excluded += 1
            continue
        for k in ks:
            sums[f"recall@{k}"] += float(relevant[:k].any())
        sums["r_precision"] += relevant[:r].sum() / r
        sums["map@r"] += sum(relevant[:j + 1].sum() / (j + 1) for j in range(r) if relevant[j]) / r
    counted = len(query_labels) - excluded
    out = {name: 100.0 * value / counted for name, value in sums.items()}
    return out | {"num_queries": len(query_labels), "excluded_queries": excluded}


def points_on_a_line(xs) -> np.ndarray:
    """2-d points (x, 0): Euclidean rankings that are easy to work out by hand."""
    return np.stack([np.asarray(xs, np.float32), np.zeros(len(xs), np.float32)], 1)


def test_oracle_hand_case_self_retrieval_with_tie_and_excluded_query():
    # x = 0, 1, 3, 6, 10 with labels 0, 0, 1, 1, 2. Query x=3 has x=0 and x=6 tied at distance 3:
    # the smaller index (x=0, label 0) ranks first, so its order is x=1, x=0, x=6 -> first hit at rank 3.
    # Label 2 has no other member: that query is excluded.
    x = points_on_a_line([0, 1, 3, 6, 10])
    got = brute_force_metrics(x, [0, 0, 1, 1, 2], ks=(1, 2, 3), metric="euclidean")
    assert got == {"recall@1": 75.0, "recall@2": 75.0, "recall@3": 100.0, "map@r": 75.0, "r_precision": 75.0,
                   "num_queries": 5, "excluded_queries": 1}
    _, ids = brute_force_topk(x, None, 3, "euclidean")
    assert ids[2].tolist() == [1, 0, 3]


def test_oracle_hand_case_query_gallery_map_at_r():
    # Gallery at distances 1, 2, 3, 4 with labels A, B, A, A: R = 3, top-3 relevance 1, 0, 1,
    # AP@R = (1/1 + 2/3) / 3 = 5/9, R-Precision = 2/3. The second query's label is absent: excluded.
    got = brute_force_metrics(points_on_a_line([0, 0]), [0, 2], points_on_a_line([1, 2, 3, 4]), [0, 1, 0, 0],
                              ks=(1,), metric="euclidean")
    assert np.isclose(got["map@r"], 500 / 9) and np.isclose(got["r_precision"], 200 / 3)
    assert got["recall@1"] == 100.0 and got["excluded_queries"] == 1


def clustered_with_duplicates(n: int = 150, dim: int = 8, classes: int = 12, seed: int = 0):
    """Gaussian clusters where a third of the rows are exact copies of other rows, some under another
    label (duplicates make exact score ties whose order decides the metrics)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.standard_normal((classes, dim)) * 2.0
    x = (centers[labels] + rng.standard_normal((n, dim))).astype(np.float32)
    copies = rng.choice(n, n // 3, replace=False)
    sources = rng.choice(n, n // 3)
    x[copies] = x[sources]
    relabel = copies[: len(copies) // 2]
    labels[relabel] = rng.integers(0, classes, len(relabel))
    labels[0] = classes + 5  # one query with no relevant reference
    return x, labels


def exact_ties(n: int = 150, seed: int = 0):
    """Unit vectors with exactly representable dot products (one-hot and (+-1/2)^4 patterns in 8-d):
    plenty of ties between distinct vectors, more than any fetch margin, for cosine and Euclidean."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 8), np.float32)
    onehot = rng.random(n) < 0.5
    x[onehot, rng.integers(0, 8, onehot.sum())] = rng.choice([-1.0, 1.0], onehot.sum())
    rest = np.flatnonzero(~onehot)
    x[rest, :4] = rng.choice([-0.5, 0.5], (len(rest), 4))
    return x, rng.integers(0, 6, n)
