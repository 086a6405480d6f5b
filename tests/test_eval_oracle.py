"""Plain float64 brute-force oracle for the evaluation tests (and tests of the oracle on hand cases).

The oracle materialises the full query x gallery score matrix in float64 with numpy, scores exact
duplicate gallery rows once (so they tie exactly, whatever the arithmetic), ranks each row with a
stable sort (ties keep the smaller gallery index first), excludes a query's own index by masking it,
and computes every metric per query with explicit loops straight from the definitions in
docs/design.md. Cosine rows are normalised in float64 and rounded once to float32: the unit vectors
the product stores and ranks.
"""
from __future__ import annotations

import numpy as np


def stored_vectors(x, metric: str, prenormalized: bool = False) -> np.ndarray:
    """The float32 vectors that are ranked: cosine rows L2-normalised (unless `prenormalized`)."""
    x = np.asarray(x, np.float32)
    if metric != "cosine" or prenormalized:
        return x
    x64 = x.astype(np.float64)
    return (x64 / np.maximum(np.linalg.norm(x64, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def brute_force_scores(query, gallery, metric: str, prenormalized: bool = False) -> np.ndarray:
    """Higher-is-closer float64 scores: inner product of the stored unit vectors, or negated squared
    Euclidean distance."""
    q = stored_vectors(query, metric, prenormalized).astype(np.float64)
    unique, inverse = np.unique(stored_vectors(gallery, metric, prenormalized), axis=0, return_inverse=True)
    u = unique.astype(np.float64)
    scores = q @ u.T if metric == "cosine" else -((q[:, None, :] - u[None, :, :]) ** 2).sum(-1)
    return scores[:, inverse.reshape(-1)]


def brute_force_topk(query, gallery, k: int, metric: str = "cosine", prenormalized: bool = False):
    """(scores, ids) of the exact top-k, ties by smaller index; gallery None = self-retrieval."""
    scores = brute_force_scores(query, query if gallery is None else gallery, metric, prenormalized)
    if gallery is None:
        np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def brute_force_metrics(query, query_labels, gallery=None, gallery_labels=None, ks=(1, 10, 100),
                        metric: str = "cosine", prenormalized: bool = False,
                        full_ranking: bool = False) -> dict[str, float]:
    """Recall@K, MAP@R, R-Precision (percent) from the full ranking, one query at a time; with
    `full_ranking` also `map` (average precision over the whole ranking) and `mrr`."""
    self_retrieval = gallery is None
    g_labels = np.asarray(query_labels if self_retrieval else gallery_labels)
    n_gallery = len(g_labels) - int(self_retrieval)
    _, ranking = brute_force_topk(query, gallery, n_gallery, metric, prenormalized)
    sums = {f"recall@{k}": 0.0 for k in ks} | {"map@r": 0.0, "r_precision": 0.0}
    if full_ranking:
        sums |= {"map": 0.0, "mrr": 0.0}
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
        if full_ranking:
            sums["map"] += sum(relevant[:j + 1].sum() / (j + 1) for j in range(len(relevant)) if relevant[j]) / r
            sums["mrr"] += 1.0 / (int(np.argmax(relevant)) + 1)
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


def test_oracle_hand_case_query_gallery_map_at_r_and_full_ranking():
    # Gallery at distances 1, 2, 3, 4 with labels A, B, A, A: R = 3, top-3 relevance 1, 0, 1,
    # AP@R = (1/1 + 2/3) / 3 = 5/9, R-Precision = 2/3; over the whole ranking AP = (1 + 2/3 + 3/4) / 3
    # and the first hit is at rank 1. The second query's label is absent: excluded.
    got = brute_force_metrics(points_on_a_line([0, 0]), [0, 2], points_on_a_line([1, 2, 3, 4]), [0, 1, 0, 0],
                              ks=(1,), metric="euclidean", full_ranking=True)
    assert np.isclose(got["map@r"], 500 / 9) and np.isclose(got["r_precision"], 200 / 3)
    assert np.isclose(got["map"], 100 * (1 + 2 / 3 + 3 / 4) / 3) and got["mrr"] == 100.0
    assert got["recall@1"] == 100.0 and got["excluded_queries"] == 1


def test_oracle_scores_exact_duplicates_alike():
    # Row 2 is a copy of row 0: every query sees them tied, so the smaller index comes first.
    x = np.array([[0.3, 0.7, 0.1], [0.9, -0.2, 0.4], [0.3, 0.7, 0.1], [-0.5, 0.5, 0.5]], np.float32)
    scores = brute_force_scores(x, x, "cosine")
    assert (scores[:, 0] == scores[:, 2]).all()
    _, ids = brute_force_topk(x, None, 3)
    assert ids[1].tolist().index(0) < ids[1].tolist().index(2)


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


def near_ties(n: int = 120, dim: int = 64, seed: int = 0):
    """Rows that are one base vector plus changes of a few float32 ulps in a few coordinates: their
    true scores differ by less than float32 can resolve (every FAISS score of them is within its
    rounding error), so only exact re-scoring orders them; plus a few exact copies."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(dim).astype(np.float32)
    x = np.repeat(base[None, :], n, 0)
    for i in range(n):
        for c in rng.choice(dim, 3, replace=False):
            x[i, c] = np.nextafter(x[i, c], np.float32(np.inf) if rng.random() < 0.5 else np.float32(-np.inf))
    x[rng.choice(n, 10, replace=False)] = x[rng.choice(n, 10)]
    return x, rng.integers(0, 4, n)
