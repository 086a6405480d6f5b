"""Single-process retrieval evaluation against the float64 brute force and hand cases.

Neighbour ids are compared for bit equality: the product guarantees them (exact float64 re-scoring in
a fixed order, ties by smaller index). Metric values are compared to 1e-9: both sides sum the same
per-query fractions, in float64, in a different order (relative error ~ n * 2^-53).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_eval_oracle import (
    brute_force_metrics,
    brute_force_topk,
    clustered_with_duplicates,
    exact_ties,
    near_ties,
    points_on_a_line,
    stored_vectors,
)

from unidml.errors import EvaluationError, UserError
from unidml.evaluation import retrieval_metrics, sharded_knn
from unidml.evaluation.knn import ShardIndex, fixed_search_bytes, query_block_size
from unidml.evaluation.metrics import normalized_mutual_information, per_query_metrics

ALL = ("recall", "map_at_r", "r_precision", "map", "mrr")


def assert_metrics_equal(got: dict, want: dict) -> None:
    assert got.keys() >= want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def knn(q: np.ndarray, g: np.ndarray | None, k: int, metric: str, **kw):
    """sharded_knn in one process on the stored vectors (self-retrieval when g is None)."""
    gallery = q if g is None else g
    return sharded_knn(q, np.arange(len(q)), gallery, np.arange(len(gallery)), k, self_retrieval=g is None,
                       metric=metric, **kw)


def test_hand_case_self_retrieval_tie_broken_by_smaller_index():
    x = points_on_a_line([0, 1, 3, 6, 10])
    got = retrieval_metrics(x, [0, 0, 1, 1, 2], ks=(1, 2, 3), metric="euclidean")
    assert got == {"recall@1": 75.0, "recall@2": 75.0, "recall@3": 100.0, "map@r": 75.0, "r_precision": 75.0,
                   "num_queries": 5, "excluded_queries": 1}


def test_hand_case_query_gallery():
    got = retrieval_metrics(points_on_a_line([0, 0]), torch.tensor([0, 2]), points_on_a_line([1, 2, 3, 4]),
                            torch.tensor([0, 1, 0, 0]), ks=(1, 2), metrics=ALL, metric="euclidean")
    assert got["map@r"] == pytest.approx(500 / 9) and got["r_precision"] == pytest.approx(200 / 3)
    assert got["map"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 4) / 3) and got["mrr"] == 100.0
    assert got["recall@1"] == 100.0 and got["recall@2"] == 100.0
    assert (got["num_queries"], got["excluded_queries"]) == (2, 1)


@pytest.mark.parametrize("data", [clustered_with_duplicates, exact_ties, near_ties])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_neighbours_and_metrics_equal_float64_brute_force(data, metric):
    x, labels = data()
    xs = stored_vectors(x, metric)
    n = len(x)
    for k in (1, 7, 40, n - 1):
        want_scores, want_ids = brute_force_topk(xs, None, k, metric, prenormalized=True)
        top = knn(xs, None, k, metric)
        np.testing.assert_array_equal(top.ids, want_ids)
        # float64 scores of float32 vectors, summed in another order: |diff| <= 2 gamma_d(2^-53) |q||x|
        np.testing.assert_allclose(top.scores, want_scores, rtol=0, atol=1e-12 * max(1.0, np.abs(want_scores).max()))
    ks = (1, 2, 4, 16, n - 1)
    assert_metrics_equal(retrieval_metrics(x, labels, ks=ks, metrics=ALL, metric=metric),
                         brute_force_metrics(x, labels, ks=ks, metric=metric, full_ranking=True))
    q, g = slice(0, 50), slice(50, None)
    assert_metrics_equal(retrieval_metrics(x[q], labels[q], x[g], labels[g], ks=ks[:4], metrics=ALL, metric=metric),
                         brute_force_metrics(x[q], labels[q], x[g], labels[g], ks=ks[:4], metric=metric,
                                             full_ranking=True))
    _, want_ids = brute_force_topk(xs[q], xs[g], 30, metric, prenormalized=True)
    np.testing.assert_array_equal(knn(xs[q], xs[g], 30, metric).ids, want_ids)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ranking_finer_than_float32_is_exact(metric):
    # The gallery rows differ from one another by a few float32 ulps: FAISS's float32 scores cannot
    # order them (its top 10 disagree with the truth), the exact re-scoring must.
    import faiss

    x, _ = near_ties()
    q = np.random.default_rng(5).standard_normal((30, x.shape[1])).astype(np.float32)
    index = faiss.IndexFlatIP(x.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, faiss_ids = index.search(q, 10)
    _, want = brute_force_topk(q, x, 10, metric, prenormalized=True)
    assert not np.array_equal(faiss_ids, want)
    np.testing.assert_array_equal(knn(q, x, 10, metric).ids, want)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_many_query_blocks_give_bit_identical_ids(metric):
    x, labels = clustered_with_duplicates(n=400, dim=16)
    xs = stored_vectors(x, metric)
    budget_mb = fixed_search_bytes() / 2**20 + 0.3  # ~300 KB beyond the fixed tiles: blocks of a few dozen rows
    assert query_block_size(400, 41, 1, 16, budget_mb) < 400 / 4
    small, large = knn(xs, None, 40, metric, memory_budget_mb=budget_mb), knn(xs, None, 40, metric)
    np.testing.assert_array_equal(small.ids, large.ids)
    np.testing.assert_array_equal(small.scores, large.scores)
    np.testing.assert_array_equal(small.ids, brute_force_topk(xs, None, 40, metric, prenormalized=True)[1])
    got = retrieval_metrics(x, labels, ks=(1, 8), metrics=ALL, metric=metric, memory_budget_mb=budget_mb)
    assert got == retrieval_metrics(x, labels, ks=(1, 8), metrics=ALL, metric=metric)
    assert_metrics_equal(got, brute_force_metrics(x, labels, ks=(1, 8), metric=metric, full_ranking=True))


def test_block_size_scales_with_budget_and_never_needs_the_full_matrix():
    # 200k x 512 references, k = 100: a 1 GiB budget gives blocks far smaller than a 200k x 200k matrix
    rows = query_block_size(200_000, 101, 1, 512, 1024)
    per_row = 12 * 3 * (2 * 101 + 8) + 16 * 4 * 101 + 4 * 512 + 16
    assert 1 <= rows < 200_000 and rows * per_row <= 1024 * 2**20
    assert query_block_size(200_000, 101, 1, 512, 2048) > rows
    assert query_block_size(200_000, 101, 4, 512, 1024) < rows
    with pytest.raises(ValueError, match="memory_budget_mb"):
        query_block_size(10, 2048, 1, 512, fixed_search_bytes() / 2**20 + 0.1)


def test_proposals_beyond_the_gpu_k_limit_come_from_torch_and_stay_exact(monkeypatch):
    # Pretend FAISS accepts at most k=16 (as FAISS GPU caps at 2048): wider proposals, here up to the
    # whole gallery (ties run past 16), come from a float32 torch matmul and are re-scored exactly.
    monkeypatch.setattr(ShardIndex, "max_k", property(lambda self: 16))
    for data, metric in ((exact_ties, "cosine"), (clustered_with_duplicates, "euclidean")):
        x, labels = data()
        xs = stored_vectors(x, metric)
        for k in (10, 40):
            np.testing.assert_array_equal(knn(xs, None, k, metric).ids,
                                          brute_force_topk(xs, None, k, metric, prenormalized=True)[1])
        assert_metrics_equal(retrieval_metrics(x, labels, ks=(1, 20, 100), metrics=ALL, metric=metric),
                             brute_force_metrics(x, labels, ks=(1, 20, 100), metric=metric, full_ranking=True))


def test_faiss_no_result_is_never_mapped_to_a_gallery_id(monkeypatch):
    # FAISS answers -1 ("no result", e.g. for NaN scores) and NaN for some rows: those rows are widened
    # and finally scored exactly against the whole shard; -1 never becomes an id.
    x, labels = clustered_with_duplicates()
    xs = stored_vectors(x, "cosine")
    real = ShardIndex._propose

    def broken(self, queries, m):
        f, local = real(self, queries, m)
        f, local = f.copy(), local.copy()
        f[::3, -2:], local[::3, -2:] = np.nan, -1
        return f, local

    monkeypatch.setattr(ShardIndex, "_propose", broken)
    top = knn(xs, None, 10, "cosine")
    assert (top.ids >= 0).all()
    np.testing.assert_array_equal(top.ids, brute_force_topk(xs, None, 10, prenormalized=True)[1])
    assert_metrics_equal(retrieval_metrics(x, labels, ks=(1, 4), metrics=ALL),
                         brute_force_metrics(x, labels, ks=(1, 4), full_ranking=True))


def test_small_galleries_are_padded_with_no_result():
    x = stored_vectors(clustered_with_duplicates(n=20)[0], "cosine")
    top = sharded_knn(x[:3], np.arange(3), x[3:8], np.arange(5), 8, self_retrieval=False)
    np.testing.assert_array_equal(top.ids[:, :5], brute_force_topk(x[:3], x[3:8], 5, prenormalized=True)[1])
    assert (top.ids[:, 5:] == -1).all() and np.isneginf(top.scores[:, 5:]).all()


def test_recall_at_k_is_exact_up_to_the_gallery_size_and_refused_beyond():
    x, labels = clustered_with_duplicates(n=60)
    got = retrieval_metrics(x, labels, ks=(1, 30, 59))
    assert_metrics_equal(got, brute_force_metrics(x, labels, ks=(1, 30, 59)))
    assert got["recall@59"] == 100.0  # the whole gallery: every query with a relevant reference hits
    with pytest.raises(EvaluationError, match=r"eval.ks: Recall@60 needs 60 references .* holds 59 besides"):
        retrieval_metrics(x, labels, ks=(1, 60))
    with pytest.raises(EvaluationError, match="holds 40; use eval.ks no larger than 40"):
        retrieval_metrics(x[:20], labels[:20], x[20:], labels[20:], ks=(41,))
    # A query without a hit in the retrieved columns misses at every K, however large.
    matches = np.array([[False, False], [False, True]])
    out = per_query_metrics(matches, np.array([1, 1]), (1, 2, 1000), ("recall",))
    assert out["recall@1000"].tolist() == [0.0, 1.0] and out["recall@1"].tolist() == [0.0, 0.0]


def test_non_finite_embeddings_stop_with_one_line():
    x, labels = clustered_with_duplicates(n=40)
    bad = x.copy()
    bad[[3, 7], 1], bad[11, 0] = np.nan, np.inf
    with pytest.raises(EvaluationError, match=r"^evaluation: 3 of 40 rows of the query embeddings are non-finite "
                                              r"\(diverged model\?\)$") as err:
        retrieval_metrics(bad, labels)
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)
    with pytest.raises(EvaluationError, match="1 of 30 rows of the gallery"):
        retrieval_metrics(x[:10], labels[:10], bad[10:], labels[10:])
    with pytest.raises(EvaluationError, match="all of|40 of 40"):
        retrieval_metrics(np.full((40, 8), np.nan, np.float32), labels)
    with pytest.raises(EvaluationError, match="1 of 1 rows of the query"):
        sharded_knn(bad[7:8], np.arange(1), x, np.arange(40), 3, self_retrieval=False)


def test_masked_rows_are_neither_queries_nor_references():
    x, labels = clustered_with_duplicates(n=80)
    x[5] = np.nan  # e.g. an unreadable image: masked out, so it does not stop the evaluation
    keep = np.ones(80, bool)
    keep[[5, 17, 60]] = False
    assert_metrics_equal(retrieval_metrics(x, labels, ks=(1, 4), metrics=ALL, query_valid=keep),
                         brute_force_metrics(x[keep], labels[keep], ks=(1, 4), full_ranking=True))
    qk, gk = keep[30:], keep[:30]
    assert_metrics_equal(
        retrieval_metrics(x[30:], labels[30:], x[:30], labels[:30], ks=(1, 4), query_valid=qk, gallery_valid=gk),
        brute_force_metrics(x[30:][qk], labels[30:][qk], x[:30][gk], labels[:30][gk], ks=(1, 4)))
    with pytest.raises(ValueError, match="query_valid must be a boolean array"):
        retrieval_metrics(x, labels, query_valid=np.arange(80))


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
    with pytest.raises(ValueError, match="style must be"):
        retrieval_metrics(x, [0, 0, 1, 1], ks=(1,), style="oml")


def test_exact_scores_do_not_depend_on_tiles_threads_or_position():
    from unidml.evaluation.scoring import exact_scores

    rng = np.random.default_rng(1)
    g = rng.standard_normal((500, 96)).astype(np.float32)
    g[250] = g[3]  # an exact duplicate far from its source
    q = rng.standard_normal((3000, 96)).astype(np.float32)
    cand = rng.integers(0, 500, (3000, 50))
    cand[:, 7], cand[:, 31] = 3, 250
    for metric in ("cosine", "euclidean"):
        many = exact_scores(q, g, cand, metric)  # several tiles and threads
        one_by_one = np.concatenate([exact_scores(q[i:i + 1], g, cand[i:i + 1, j:j + 1], metric)
                                     for i in range(0, 3000, 97) for j in (0, 7, 31)]).reshape(-1, 3)
        np.testing.assert_array_equal(many[::97][:, [0, 7, 31]], one_by_one)
        np.testing.assert_array_equal(many[:, 7], many[:, 31])  # duplicates tie exactly
        # against a correctly rounded sum of the exact products: |err| <= gamma_d(2^-53) * sum |terms|
        i, j = 5, 11
        x = g[cand[i, j]].astype(np.float64)
        terms = q[i] * x if metric == "cosine" else -(x - q[i]) ** 2
        assert abs(many[i, j] - math.fsum(terms)) <= 96 * 2.0 ** -53 * np.abs(terms).sum()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_faiss_scores_lie_within_the_candidate_bound(metric):
    # The bound the candidate count rests on, checked where float32 error is largest: long vectors
    # (d = 2048) of mixed norms, FAISS's BLAS path and its direct path (a single query).
    import faiss

    from unidml.evaluation.scoring import exact_scores, row_norms, score_error_bound

    rng = np.random.default_rng(2)
    g = (rng.standard_normal((300, 2048)) * rng.uniform(0.1, 10, (300, 1))).astype(np.float32)
    q = (rng.standard_normal((40, 2048)) * 3).astype(np.float32)
    index = faiss.IndexFlatIP(2048) if metric == "cosine" else faiss.IndexFlatL2(2048)
    index.add(g)
    bound = score_error_bound(row_norms(q), float(row_norms(g).max()), 2048, metric)
    for queries, rows in ((q, slice(None)), (q[:1], slice(0, 1))):
        f, ids = index.search(queries, 300)
        f = f if metric == "cosine" else -f
        err = np.abs(f.astype(np.float64) - exact_scores(queries, g, ids, metric))
        assert (err <= bound[rows, None]).all()
        assert err.max() > 0  # float32 does round here: the check is not vacuous
