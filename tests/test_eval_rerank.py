"""Re-ranking after the exact k-NN (`eval.rerank`) against dense float64 numpy implementations written here.

The references materialise every pairwise score (BLAS, float64) and follow the published algorithms
loop by loop: k-reciprocal encoding as in Zhong et al.'s code (without its per-row distance
normalisation, see docs/design.md, "Re-ranking"), alpha-QE and alpha-DBA as Radenovic et al. define
them. Their sums run in another order than the product's, so values agree to float64 rounding (k-reciprocal
distances, sums of at most N terms below 1: N * 2^-52 each) or, for the averaged vectors rounded to
float32, to one float32 rounding of a unit vector's coordinates (scores within sqrt(d) * 2^-23 here); the
test data keep every compared gap far above these bounds, so the orders must be equal.
Sharded runs (2 gloo processes) must give the one-process lists bit for bit.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch.multiprocessing as mp
from command_helpers import command, write_untrained_checkpoint
from gloo_workers import run_on_gloo_rank
from test_eval_distributed import free_port
from test_eval_oracle import stored_vectors

from unidml.config import ConfigError, RerankConfig
from unidml.errors import UserError
from unidml.evaluation import retrieval_metrics, sharded_knn
from unidml.evaluation.distributed import Collectives
from unidml.evaluation.embedding_files import read_embeddings
from unidml.evaluation.retrieval import sharded_retrieval_metrics
from unidml.launcher.commands import embed, evaluate
from unidml.run_config import load_run_config

U52 = 2.0 ** -52
U23 = 2.0 ** -23
KR = RerankConfig(name="k_reciprocal", k1=6, k2=3, lambda_value=0.3, candidates=1000)
QE = RerankConfig(name="query_expansion", top_n=3, alpha=3.0)
DBA = RerankConfig(name="database_augmentation", top_n=2, alpha=1.5)


def clustered(n: int = 60, dim: int = 16, classes: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (float32) around `classes` centres, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, dim))
    return stored_vectors(centres[labels] + 0.8 * rng.standard_normal((n, dim)), "cosine"), labels


# ------------------------------------------------------------------------------------ dense references
def dense_k_reciprocal(q: np.ndarray, g: np.ndarray | None, k1: int, k2: int, lam: float) -> np.ndarray:
    """Final distances (queries x gallery) of k-reciprocal re-ranking, dense, as in Zhong et al.'s code:
    the universe is the queries followed by the gallery (the queries alone in self-retrieval)."""
    u = (q if g is None else np.concatenate([q, g])).astype(np.float64)
    scores = u @ u.T
    dist = 2.0 - 2.0 * scores
    rank = np.argsort(-scores, axis=1, kind="stable")
    n = len(u)

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, :k + 1]
        backward = rank[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = r
        for candidate in r:
            rc = reciprocal(candidate, int(np.around(k1 / 2.0)))
            if len(np.intersect1d(rc, r)) > 2.0 / 3 * len(rc):
                expansion = np.append(expansion, rc)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    nq = len(q)
    gallery = slice(0, nq) if g is None else slice(nq, n)
    overlap = np.minimum(v[:nq, None, :], v[None, gallery, :]).sum(-1)
    final = (1 - lam) * (1 - overlap / (2 - overlap)) + lam * dist[:nq, gallery]
    if g is None:
        np.fill_diagonal(final, np.inf)
    return final


def dense_average(x: np.ndarray, refs: np.ndarray, top_n: int, alpha: float, exclude_self: bool) -> np.ndarray:
    """Rows x_i + sum of max(s, 0)^alpha r_j over the top-n references by similarity s, L2-normalised, float32."""
    x64, r64 = x.astype(np.float64), refs.astype(np.float64)
    s = x64 @ r64.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    top = np.argsort(-s, axis=1, kind="stable")[:, :top_n]
    w = np.maximum(np.take_along_axis(s, top, 1), 0) ** alpha
    out = x64 + np.einsum("ij,ijd->id", w, r64[top])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def dense_scores(q: np.ndarray, g: np.ndarray, exclude_self: bool) -> np.ndarray:
    s = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    return s


def assert_same_order(got_ids: np.ndarray, got_score: np.ndarray, want: np.ndarray, tol: float,
                      higher_is_closer: bool) -> None:
    """`got` lists equal the reference's ranking of `want` (a dense score or distance matrix), whose
    compared gaps must exceed `tol` for the test to decide anything."""
    key = -want if higher_is_closer else want
    order = np.argsort(key, axis=1, kind="stable")[:, :got_ids.shape[1]]
    ordered = np.take_along_axis(key, order, 1)
    assert np.diff(ordered, axis=1).min() > 2 * tol  # well separated: rounding cannot reorder them
    np.testing.assert_array_equal(got_ids, order)
    want_scores = np.take_along_axis(want, order, 1)
    np.testing.assert_allclose(got_score, want_scores if higher_is_closer else -want_scores, rtol=0, atol=tol)


# ------------------------------------------------------------------------------------ exact small cases
@pytest.mark.parametrize("self_retrieval", [True, False])
def test_k_reciprocal_equals_the_dense_reference_when_the_candidates_cover_the_gallery(self_retrieval):
    x, _ = clustered()
    q, g = (x, None) if self_retrieval else (x[:20], x[20:])
    gallery = x if g is None else g
    top = sharded_knn(q, np.arange(len(q)), gallery, np.arange(len(gallery)), len(gallery) - int(self_retrieval),
                      self_retrieval=self_retrieval, rerank=KR)
    want = dense_k_reciprocal(q, g, KR.k1, KR.k2, KR.lambda_value)  # the query itself (inf) sorts last
    assert_same_order(top.ids, top.scores, want, 8 * len(x) * U52, higher_is_closer=False)
    plain = sharded_knn(q, np.arange(len(q)), gallery, np.arange(len(gallery)), top.ids.shape[1],
                        self_retrieval=self_retrieval)
    assert not np.array_equal(top.ids, plain.ids)  # the re-ranking changed the lists


def test_k_reciprocal_re_orders_only_the_candidates():
    x, _ = clustered()
    plain = sharded_knn(x, np.arange(60), x, np.arange(60), 8, self_retrieval=True)
    few = RerankConfig(**{**KR.__dict__, "candidates": 8})
    top = sharded_knn(x, np.arange(60), x, np.arange(60), 8, self_retrieval=True, rerank=few)
    np.testing.assert_array_equal(np.sort(top.ids, 1), np.sort(plain.ids, 1))  # the same 8, re-ordered
    assert not np.array_equal(top.ids, plain.ids)


@pytest.mark.parametrize("self_retrieval", [True, False])
def test_query_expansion_equals_the_dense_reference(self_retrieval):
    x, _ = clustered()
    q, g = (x, x) if self_retrieval else (x[:20], x[20:])
    top = sharded_knn(q, np.arange(len(q)), g, np.arange(len(g)), 10, self_retrieval=self_retrieval, rerank=QE)
    expanded = dense_average(q, g, QE.top_n, QE.alpha, exclude_self=self_retrieval)
    tol = np.sqrt(q.shape[1]) * U23
    assert_same_order(top.ids, top.scores, dense_scores(expanded, g, self_retrieval), tol, higher_is_closer=True)


@pytest.mark.parametrize("self_retrieval", [True, False])
def test_database_augmentation_equals_the_dense_reference(self_retrieval):
    x, labels = clustered()
    q, g = (x, x) if self_retrieval else (x[:20], x[20:])
    top = sharded_knn(q, np.arange(len(q)), g, np.arange(len(g)), 10, self_retrieval=self_retrieval, rerank=DBA)
    augmented = dense_average(g, g, DBA.top_n, DBA.alpha, exclude_self=True)
    tol = np.sqrt(q.shape[1]) * U23
    assert_same_order(top.ids, top.scores, dense_scores(q, augmented, self_retrieval), tol, higher_is_closer=True)


def test_none_equals_no_re_ranking():
    x, labels = clustered()
    plain = sharded_knn(x, np.arange(60), x, np.arange(60), 10, self_retrieval=True)
    none = sharded_knn(x, np.arange(60), x, np.arange(60), 10, self_retrieval=True, rerank=RerankConfig(name="none"))
    np.testing.assert_array_equal(none.ids, plain.ids)
    np.testing.assert_array_equal(none.scores, plain.scores)
    ks = (1, 2, 4)
    assert retrieval_metrics(x, labels, ks=ks, rerank=RerankConfig()) == retrieval_metrics(x, labels, ks=ks)
    for rerank in (KR, QE, DBA):  # each one changes these metrics, so the comparison above can fail
        assert retrieval_metrics(x, labels, ks=ks, rerank=rerank) != retrieval_metrics(x, labels, ks=ks)


def test_refused_combinations_are_one_line():
    x, labels = clustered()
    with pytest.raises(ValueError, match="map and mrr"):
        retrieval_metrics(x, labels, ks=(1,), metrics=("recall", "map"), rerank=KR)
    with pytest.raises(ValueError, match="cosine"):
        retrieval_metrics(x, labels, ks=(1,), metric="euclidean", rerank=QE)
    for override, key in (("eval.rerank.name=qe", "eval.rerank.name"), ("eval.rerank.lambda_value=1.5",
                          "eval.rerank.lambda_value"), ("eval.rerank.k1=0", "eval.rerank.k1"),
                          ("eval.rerank.alpha=-1", "eval.rerank.alpha")):
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            load_run_config(None, [override])
    with pytest.raises(ConfigError, match="key 'eval.metrics'"):
        load_run_config(None, ["eval.rerank.name=k_reciprocal", "eval.metrics=[recall,mrr]"])
    with pytest.raises(ConfigError, match="key 'eval.rerank.name'.*cosine"):
        load_run_config(None, ["eval.rerank.name=database_augmentation", "eval.metric=euclidean"])
    with pytest.raises(ConfigError, match="key 'eval.rerank.k2'"):
        load_run_config(None, ["eval.rerank.name=k_reciprocal", "eval.rerank.k1=3", "eval.rerank.k2=5"])


# ------------------------------------------------------------------------------------ 1 and 2 shards
CASES = {"none": RerankConfig(), "k_reciprocal": KR, "query_expansion": QE, "database_augmentation": DBA}


def sharded_cases(comm: Collectives | None, rank: int, world: int) -> dict:
    """Every re-ranking, self-retrieval and query/gallery, the gallery split over `world` ranks."""
    x, labels = clustered(n=90)
    out = {}
    for name, rerank in CASES.items():
        for mode, (qn, first) in {"self": (90, 0), "qg": (30, 30)}.items():
            gallery = np.array_split(np.arange(first, 90), world)[rank]
            ids = gallery - first
            top = sharded_knn(x[:qn], np.arange(qn), x[gallery], ids, 12, self_retrieval=mode == "self",
                              memory_budget_mb=33, comm=comm, rerank=rerank)
            out[f"{name}/{mode}/ids"], out[f"{name}/{mode}/scores"] = top.ids, top.scores
            out[f"{name}/{mode}/metrics"] = sharded_retrieval_metrics(
                x[:qn], labels[:qn], np.arange(qn), x[gallery], labels[gallery], ids, self_retrieval=mode == "self",
                ks=(1, 4), metrics=("recall", "map_at_r", "r_precision"), metric="cosine", memory_budget_mb=33,
                device="cpu", comm=comm or Collectives(distributed=False), rerank=rerank)
    return out


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    run_on_gloo_rank(lambda r, w: sharded_cases(Collectives(distributed=True), r, w), rank, world, port, out_dir)


@pytest.mark.timeout(300)
def test_two_shards_give_the_one_process_lists_bit_for_bit(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    want = sharded_cases(None, 0, 1)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            got = pickle.load(f)
        for case, value in want.items():
            if isinstance(value, dict):
                assert got[case] == value, (rank, case)
            else:
                np.testing.assert_array_equal(got[case], value, err_msg=f"rank {rank}: {case}")


# ------------------------------------------------------------------------------------ the eval command
OVERRIDES = ["data.synthetic.classes=12", "data.synthetic.per_class=8", "data.synthetic.size=32",
             "data.image_size=32", "data.resize_size=32", "data.num_workers=0", "data.backend=torchvision",
             "model.arch=resnet18", "model.pretrained=''", "model.pretrained_required=false", "eval.ks=[1,2,4]",
             "eval.batch_size=16", "engine.precision=fp32", "engine.device=cpu", "data.val_classes=0",
             "eval.split=test"]


@pytest.fixture(scope="module")
def test_split_embeddings(tmp_path_factory):
    """`unidml embed` of the 48-image test split of an untrained checkpoint whose run has eval.ks [1, 2, 4]."""
    root = tmp_path_factory.mktemp("rerank_cmd")
    checkpoint = write_untrained_checkpoint(root, OVERRIDES)
    out = root / "test.npy"
    assert command(embed, ["--checkpoint", str(checkpoint), "--split", "test", "--out", str(out)]) == 0
    return out


def test_eval_embeddings_defaults_to_the_runs_ks(test_split_embeddings, tmp_path):
    vectors, labels, _, _ = read_embeddings(test_split_embeddings)
    assert len(vectors) == 48  # under 100 references: Recall@100 would be refused
    assert command(evaluate, ["--embeddings", str(test_split_embeddings), "--out", str(tmp_path / "e.json")]) == 0
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["metrics"] == pytest.approx(retrieval_metrics(vectors, labels, ks=(1, 2, 4)))
    assert record["rerank"] == {"name": "none"}


def test_eval_rerank_flag_and_record(test_split_embeddings, tmp_path, capsys):
    vectors, labels, _, _ = read_embeddings(test_split_embeddings)
    argv = ["--embeddings", str(test_split_embeddings), "--rerank", "k_reciprocal", "eval.rerank.k1=5",
            "eval.rerank.k2=2", "--out", str(tmp_path / "k.json")]
    assert command(evaluate, argv) == 0
    record = json.loads((tmp_path / "k.json").read_text())
    assert record["rerank"] == {"name": "k_reciprocal", "k1": 5, "k2": 2, "lambda_value": 0.3, "candidates": 100}
    want = retrieval_metrics(vectors, labels, ks=(1, 2, 4), rerank=RerankConfig(name="k_reciprocal", k1=5, k2=2))
    assert record["metrics"] == pytest.approx(want)
    assert "rerank k_reciprocal (k1=5, k2=2, lambda_value=0.3, candidates=100): recall@1=" in capsys.readouterr().out
    with pytest.raises(UserError, match="key 'eval.rerank.top_n'"):
        command(evaluate, ["--embeddings", str(test_split_embeddings), "--rerank", "query_expansion",
                           "eval.rerank.top_n=0", "--out", str(tmp_path / "q.json")])
