"""`retrieval_metrics(..., style="pml")` against pytorch-metric-learning's AccuracyCalculator on random data.

AccuracyCalculator ranks by FAISS float32 squared Euclidean distances; we rank by exact float64 scores.
The data are checked to be unambiguous at float32 (FAISS's full ranking equals the exact one for every
query), so both sides rank alike and the values must agree to rounding: both average the same per-query
fractions in float64 (1e-12 relative), except PML's mean reciprocal rank, which it averages in float32
(n reciprocals rounded and summed in float32: relative error below (n + 2) 2^-24).
"""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from test_eval_oracle import brute_force_topk

from unidml.evaluation import retrieval_metrics

KNN_METRICS = ("recall", "map_at_r", "r_precision", "map", "mrr")
PML_KNN_KEYS = ("precision_at_1", "mean_average_precision_at_r", "r_precision", "mean_average_precision",
                "mean_reciprocal_rank")


def random_embeddings(n: int = 100, dim: int = 16, classes: int = 5, seed: int = 0, unit: bool = True):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = (rng.standard_normal((classes, dim))[labels] * 0.7 + rng.standard_normal((n, dim))).astype(np.float32)
    if unit:
        x = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
    else:
        x *= rng.uniform(0.2, 3.0, (n, 1)).astype(np.float32)  # norms that matter: cosine ranks otherwise
    return x, labels


def assert_float32_ranking_is_exact(q: np.ndarray, g: np.ndarray | None) -> None:
    """Precondition: FAISS's float32 L2 ranking (what PML uses) equals the exact one for every query."""
    gallery = q if g is None else g
    index = faiss.IndexFlatL2(q.shape[1])
    index.add(gallery)
    _, ids = index.search(q, len(gallery))
    if g is None:
        ids = np.stack([row[row != i] for i, row in enumerate(ids)])
    _, want = brute_force_topk(q, g, len(gallery) - int(g is None), "euclidean")
    assert np.array_equal(ids, want), "test data are not unambiguous at float32"


def pml(q, ql, g=None, gl=None, **kwargs) -> dict:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(device=torch.device("cpu"), **kwargs)
    return calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(ql), None if g is None else torch.from_numpy(g),
                             None if gl is None else torch.from_numpy(gl))


def assert_same(ours: dict, theirs: dict, n: int) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        rel = (n + 2) * 2.0 ** -24 if key == "mean_reciprocal_rank" else 1e-12
        assert ours[key] == pytest.approx(value, rel=rel, abs=1e-12), key


@pytest.mark.parametrize("split", ["self", "query_gallery"])
def test_pml_style_equals_accuracy_calculator(split):
    x, labels = random_embeddings()
    q, ql, g, gl = (x, labels, None, None) if split == "self" else (x[:40], labels[:40], x[40:], labels[40:])
    assert_float32_ranking_is_exact(q, g)
    # Default k=None: AccuracyCalculator ranks the whole gallery, so the full-ranking metrics are exact too.
    theirs = pml(q, ql, g, gl, include=PML_KNN_KEYS)
    for metric in ("cosine", "euclidean"):  # unit vectors: both rank alike
        assert_same(retrieval_metrics(q, ql, g, gl, metrics=KNN_METRICS, metric=metric, style="pml"), theirs, len(q))
    # k="max_bin_count", the usual setting for the @R metrics
    at_r = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    assert_same(retrieval_metrics(q, ql, g, gl, metrics=("recall", "map_at_r", "r_precision"), style="pml"),
                pml(q, ql, g, gl, include=at_r, k="max_bin_count"), len(q))


def test_raw_embeddings_reproduce_pml_with_euclidean_while_cosine_normalises():
    x, labels = random_embeddings(n=80, unit=False)
    assert_float32_ranking_is_exact(x, None)
    theirs = pml(x, labels, include=PML_KNN_KEYS)
    assert_same(retrieval_metrics(x, labels, metrics=KNN_METRICS, metric="euclidean", style="pml"), theirs, len(x))
    cosine = retrieval_metrics(x, labels, metrics=KNN_METRICS, style="pml")  # ranks the L2-normalised rows
    assert cosine != pytest.approx(theirs, rel=1e-6)
    unit = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
    assert cosine == pytest.approx(retrieval_metrics(unit, labels, metrics=KNN_METRICS, style="pml"), rel=1e-12)


def test_default_style_is_percent_with_counts_and_pml_style_is_the_same_in_fractions():
    x, labels = random_embeddings()
    percent = retrieval_metrics(x, labels, ks=(1, 5), metrics=KNN_METRICS + ("nmi",))
    fractions = retrieval_metrics(x, labels, ks=(1, 5), metrics=KNN_METRICS + ("nmi",), style="pml")
    assert set(percent) == {"recall@1", "recall@5", "map@r", "r_precision", "map", "mrr", "nmi", "num_queries",
                            "excluded_queries"}
    assert set(fractions) == set(PML_KNN_KEYS) | {"NMI"}
    pairs = {"precision_at_1": "recall@1", "mean_average_precision_at_r": "map@r", "r_precision": "r_precision",
             "mean_average_precision": "map", "mean_reciprocal_rank": "mrr", "NMI": "nmi"}
    for pml_key, key in pairs.items():
        assert fractions[pml_key] == pytest.approx(percent[key] / 100, rel=1e-12)
        assert 0.0 <= fractions[pml_key] <= 1.0
