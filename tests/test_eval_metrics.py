"""Single-process retrieval evaluation against the torch brute force, hand cases and PML's AccuracyCalculator."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_eval_oracle import (brute_force_metrics, brute_force_topk, clustered_with_duplicates, exact_ties,
                              points_on_a_line)
from unidml.evaluation import retrieval_metrics, sharded_knn
from unidml.evaluation.knn import ShardIndex, cap_k, query_block_size
from unidml.evaluation.metrics import normalized_mutual_information

ALL = ("recall", "map_at_r", "r_precision")


def assert_metrics_equal(got: dict, want: dict) -> None:
    assert got.keys() >= want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def test_hand_case_self_retrieval_tie_broken_by_smaller_index():
    x = points_on_a_line([0, 1, 3, 6, 10])
    got = retrieval_metrics(x, [0, 0, 1, 1, 2], ks=(1, 2, 3), metric="euclidean")
    assert got == {"recall@1": 75.0, "recall@2": 75.0, "recall@3": 100.0, "map@r": 75.0, "r_precision": 75.0,
                   "num_queries": 5, "excluded_queries": 1}


def test_hand_case_query_gallery():
    got = retrieval_metrics(points_on_a_line([0, 0]), torch.tensor([0, 2]), points_on_a_line([1, 2, 3, 4]),
                            torch.tensor([0, 1, 0, 0]), ks=(1, 2), metric="euclidean")
    assert got["map@r"] == pytest.approx(500 / 9) and got["r_precision"] == pytest.approx(200 / 3)
    assert got["recall@1"] == 100.0 and got["recall@2"] == 100.0
    assert (got["num_queries"], got["excluded_queries"]) == (2, 1)


@pytest.mark.parametrize("data", [clustered_with_duplicates, exact_ties])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_neighbours_and_metrics_equal_brute_force(data, metric):
    x, labels = data()
    ks = (1, 2, 4, 16)
    for k in (1, 7, 40):
        want_scores, want_ids = brute_force_topk(x, None, k, metric)
        top = sharded_knn(_prepared(x, metric), np.arange(len(x)), _prepared(x, metric), np.arange(len(x)), k,
                          self_retrieval=True, metric=metric)
        np.testing.assert_array_equal(top.ids, want_ids)
        np.testing.assert_allclose(top.scores, want_scores, rtol=1e-5, atol=1e-5)
    assert_metrics_equal(retrieval_metrics(x, labels, ks=ks, metric=metric), brute_force_metrics(x, labels, ks=ks, metric=metric))
    q, g = slice(0, 50), slice(50, None)
    assert_metrics_equal(retrieval_metrics(x[q], labels[q], x[g], labels[g], ks=ks, metric=metric),
                         brute_force_metrics(x[q], labels[q], x[g], labels[g], ks=ks, metric=metric))
    _, want_ids = brute_force_topk(x[q], x[g], 30, metric)
    top = sharded_knn(_prepared(x[q], metric), np.arange(50), _prepared(x[g], metric), np.arange(len(x) - 50), 30,
                      self_retrieval=False, metric=metric)
    np.testing.assert_array_equal(top.ids, want_ids)


def _prepared(x: np.ndarray, metric: str) -> np.ndarray:
    return torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy() if metric == "cosine" else x


def test_small_memory_budget_gives_many_blocks_and_the_same_result():
    x, labels = clustered_with_duplicates(n=400, dim=16)
    budget_mb = 16.2  # 16 MiB of FAISS's CPU tile plus ~200 KB of working memory
    assert query_block_size(400, 41, 1, 16, budget_mb) < 400 / 4
    small = retrieval_metrics(x, labels, ks=(1, 8), memory_budget_mb=budget_mb)
    assert_metrics_equal(small, retrieval_metrics(x, labels, ks=(1, 8)))
    assert_metrics_equal(small, brute_force_metrics(x, labels, ks=(1, 8)))


def test_block_size_scales_with_budget_and_never_needs_the_full_matrix():
    # 200k x 512 references, k = 100: a 1 GiB budget gives blocks far smaller than a 200k x 200k matrix
    rows = query_block_size(200_000, 101, 1, 512, 1024)
    assert 1 <= rows < 200_000 and rows * (12 * 8 * 101 + 4 * 512) <= 1024 * 2**20
    assert query_block_size(200_000, 101, 1, 512, 2048) > rows
    assert query_block_size(200_000, 101, 4, 512, 1024) < rows
    with pytest.raises(ValueError, match="memory_budget_mb"):
        query_block_size(10, 2048, 1, 512, 16)


def test_matches_pytorch_metric_learning_accuracy_calculator():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 20, 600)
    x = (rng.standard_normal((20, 32))[labels] * 0.8 + rng.standard_normal((600, 32))).astype(np.float32)
    x = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              k="max_bin_count")
    for q, ql, g, gl in [(x, labels, None, None), (x[:200], labels[:200], x[200:], labels[200:])]:
        pml = calc.get_accuracy(q, torch.from_numpy(ql), g, None if gl is None else torch.from_numpy(gl))
        ours = retrieval_metrics(q, ql, g, gl, ks=(1,), metrics=ALL)
        assert ours["recall@1"] == pytest.approx(100 * pml["precision_at_1"], abs=1e-6)
        assert ours["r_precision"] == pytest.approx(100 * pml["r_precision"], abs=1e-6)
        assert ours["map@r"] == pytest.approx(100 * pml["mean_average_precision_at_r"], abs=1e-6)


def test_nmi_hand_values_and_kmeans_on_separated_clusters():
    assert normalized_mutual_information(np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7])) == pytest.approx(1.0)
    assert normalized_mutual_information(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    # labels (0,0,1,1) vs clusters (0,0,0,1): I = 1.5 log 2 - 0.75 log 3, H(U) = log 2, H(V) = 2 log 2 - 0.75 log 3
    want = (1.5 * np.log(2) - 0.75 * np.log(3)) / ((3 * np.log(2) - 0.75 * np.log(3)) / 2)
    assert normalized_mutual_information(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == pytest.approx(want)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 30)
    x = np.eye(16, dtype=np.float32)[labels] * 10 + rng.standard_normal((150, 16)).astype(np.float32) * 0.01
    got = retrieval_metrics(x, labels, ks=(1,), metrics=("recall", "nmi"))
    assert got["nmi"] == pytest.approx(100.0) and got["recall@1"] == 100.0


def test_bad_requests_are_one_line_errors():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="unknown metric"):
        retrieval_metrics(x, [0, 0, 1, 1], metrics=("recall", "mAP"))
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(x, [0, 1])
    with pytest.raises(ValueError, match="metric must be"):
        retrieval_metrics(x, [0, 0, 1, 1], metric="manhattan")


def test_ties_past_the_gpu_k_limit_are_resolved_from_full_score_rows(monkeypatch):
    # Pretend FAISS accepts at most k=16 (as FAISS GPU caps at 2048): rows whose ties run past it
    # are finished from their full score rows, still exactly.
    monkeypatch.setattr(ShardIndex, "max_k", property(lambda self: 16))
    x, _ = exact_ties()
    top = sharded_knn(x, np.arange(len(x)), x, np.arange(len(x)), 10, self_retrieval=True)
    np.testing.assert_array_equal(top.ids, brute_force_topk(x, None, 10)[1])


def test_k_is_capped_at_the_gpu_limit_with_a_warning_and_small_galleries_are_padded():
    with pytest.warns(UserWarning, match="exceeds FAISS GPU's limit"):
        assert cap_k(5000, "MAP@R", on_gpu=True, self_retrieval=True) == 2047
    assert cap_k(5000, "MAP@R", on_gpu=False, self_retrieval=True) == 5000
    x = _prepared(clustered_with_duplicates(n=20)[0], "cosine")
    top = sharded_knn(x[:3], np.arange(3), x[3:8], np.arange(5), 8, self_retrieval=False)
    np.testing.assert_array_equal(top.ids[:, :5], brute_force_topk(x[:3], x[3:8], 5)[1])
    assert (top.ids[:, 5:] == -1).all() and np.isneginf(top.scores[:, 5:]).all()
