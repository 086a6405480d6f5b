"""Model evaluation in one process and sharded over 1, 2 and 3 gloo ranks, against the float64 brute force.

Neighbour ids and scores are compared bit for bit with the single-process search: every rank re-scores
its candidates exactly in float64 in one fixed order, so the merge is the same for any shard count.
Metric values are compared to 1e-9 (float64 sums of the same per-query fractions).
"""
from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from gloo_workers import run_on_gloo_rank
from test_eval_oracle import brute_force_metrics, brute_force_topk, clustered_with_duplicates, exact_ties

from unidml.errors import EvaluationError
from unidml.evaluation import evaluate_model, sharded_knn
from unidml.evaluation.distributed import Collectives
from unidml.evaluation.knn import fixed_search_bytes
from unidml.evaluation.retrieval import sharded_retrieval_metrics

KS = (1, 2, 4, 16)
METRICS = ("recall", "map_at_r", "r_precision", "map", "mrr")
SMALL_BUDGET_MB = fixed_search_bytes() / 2**20 + 0.3  # ~300 KB beyond the fixed tiles: many query blocks


class AutocastRecorder(torch.nn.Module):
    """A fixed linear embedding that records whether it ran in eval mode and under which autocast.

    Weights are multiples of 1/16 and the inputs (`dyadic`) multiples of 1/16 below 8 in magnitude, so
    every product and sum is exact in float32 and every input exact in bf16: a row's embedding does not
    depend on its batch or on the GEMM kernel, and under bf16 it is the exact value rounded once to bf16.
    """

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            w = torch.eye(dim) + 0.1 * torch.arange(dim * dim).reshape(dim, dim).sin()
            self.linear.weight.copy_(torch.round(16 * w) / 16)
            self.linear.bias.zero_()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_autocast_enabled("cpu")))
        return self.linear(x)


def dyadic(x: np.ndarray) -> np.ndarray:
    """Inputs on a 1/16 grid, |x| < 8 (exact in bf16 and in every float32 product of the model)."""
    return (np.clip(np.round(x * 16), -127, 127) / 16).astype(np.float32)


def data() -> tuple[np.ndarray, np.ndarray]:
    x, labels = clustered_with_duplicates(n=151)
    return dyadic(x), labels


def embed(model: torch.nn.Module, x: np.ndarray, dtype: torch.dtype = torch.float32,
          normalize: bool = True) -> np.ndarray:
    """The model's exact float64 output rounded to `dtype`, L2-normalised as cosine evaluation does."""
    w = model.linear.weight.detach().double().numpy()
    out = torch.from_numpy(x.astype(np.float64) @ w.T).to(dtype).float()
    return (torch.nn.functional.normalize(out, dim=1) if normalize else out).numpy()


def loader(x: np.ndarray, labels: np.ndarray, indices: np.ndarray, batch: int = 7) -> list[tuple]:
    """What an eval loader yields: (images, labels, global indices) batches."""
    return [(torch.from_numpy(x[indices[i:i + batch]]), torch.from_numpy(labels[indices[i:i + batch]]),
             torch.from_numpy(indices[i:i + batch])) for i in range(0, len(indices), batch)]


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous shard; like a padding distributed sampler, the last rank repeats index 0 and 1."""
    part = np.array_split(np.arange(n), world)[rank]
    return np.concatenate([part, [0, 1]]) if rank == world - 1 and world > 1 else part


def knn_cases(comm: Collectives | None, rank: int = 0, world: int = 1) -> dict:
    """Neighbour lists of the self and query/gallery cases, the gallery split over `world` ranks."""
    x, _ = clustered_with_duplicates(n=151)
    xn = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
    part = np.array_split(np.arange(len(x)), world)[rank]
    t, _ = exact_ties()
    gallery = np.array_split(np.arange(50, len(t)), world)[rank]
    self_top = sharded_knn(xn, np.arange(len(x)), xn[part], part, 20, self_retrieval=True,
                           memory_budget_mb=SMALL_BUDGET_MB, comm=comm)
    qg_top = sharded_knn(t[:50], np.arange(50), t[gallery], gallery - 50, 30, self_retrieval=False,
                         metric="euclidean", comm=comm)
    return {"self_knn": self_top.ids, "self_scores": self_top.scores, "qg_knn": qg_top.ids, "qg_scores": qg_top.scores}


def run_cases(rank: int, world: int) -> dict:
    """Every case, as this rank computes it (the parent compares all ranks with the oracle)."""
    comm = Collectives(distributed=True)
    out = knn_cases(comm, rank, world)
    x, labels = clustered_with_duplicates(n=151)
    xn = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
    part = np.array_split(np.arange(len(x)), world)[rank]
    out["self_metrics"] = sharded_retrieval_metrics(
        xn, labels, np.arange(len(x)), xn[part], labels[part], part, self_retrieval=True, ks=KS, metrics=METRICS,
        metric="cosine", memory_budget_mb=SMALL_BUDGET_MB, device="cpu", comm=comm)
    t, t_labels = exact_ties()
    gallery = np.array_split(np.arange(50, len(t)), world)[rank]
    out["qg_metrics"] = sharded_retrieval_metrics(
        t[:50], t_labels[:50], np.arange(50), t[gallery], t_labels[gallery], gallery - 50, self_retrieval=False,
        ks=KS, metrics=METRICS, metric="euclidean", memory_budget_mb=1024, device="cpu", comm=comm)
    model = AutocastRecorder()
    xq, _ = data()
    idx = shard_indices(len(x), rank, world)
    out["model_self"] = evaluate_model(model, loader(xq, labels, idx), ks=KS, metrics=METRICS, device="cpu",
                                       precision="fp32")
    q_idx = np.array_split(np.arange(40), world)[rank]
    g_idx = shard_indices(len(x) - 40, rank, world)
    out["model_qg"] = evaluate_model(model, loader(xq, labels, q_idx), loader(xq[40:], labels[40:], g_idx), ks=KS,
                                     metrics=METRICS, metric="euclidean", device="cpu", precision="fp32")
    # A non-finite row on one rank only, and a K beyond the gallery: every rank stops with the same line.
    bad = t[gallery].copy()
    if rank == 0:
        bad[0, 0] = np.nan
    for case, kwargs in (("nan", {"ks": KS}), ("big_k", {"ks": (1, 101)})):
        try:
            sharded_retrieval_metrics(t[:50], t_labels[:50], np.arange(50), bad if case == "nan" else t[gallery],
                                      t_labels[gallery], gallery - 50, self_retrieval=False, metrics=METRICS,
                                      metric="euclidean", memory_budget_mb=1024, device="cpu", comm=comm, **kwargs)
            out[case] = "no error"
        except EvaluationError as exc:
            out[case] = str(exc)
    return out


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    run_on_gloo_rank(run_cases, rank, world, port, out_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected() -> dict:
    model = AutocastRecorder()
    x, labels = clustered_with_duplicates(n=151)
    t, t_labels = exact_ties()
    e, raw = embed(model, data()[0]), embed(model, data()[0], normalize=False)
    return knn_cases(None) | {
        "self_metrics": brute_force_metrics(x, labels, ks=KS, full_ranking=True),
        "qg_metrics": brute_force_metrics(t[:50], t_labels[:50], t[50:], t_labels[50:], ks=KS, metric="euclidean",
                                          full_ranking=True),
        "model_self": brute_force_metrics(e, labels, ks=KS, prenormalized=True, full_ranking=True),
        "model_qg": brute_force_metrics(raw[:40], labels[:40], raw[40:], labels[40:], ks=KS, metric="euclidean",
                                        full_ranking=True),
        "nan": "evaluation: 1 of 100 rows of the gallery embeddings are non-finite (diverged model?)",
        "big_k": "eval.ks: Recall@101 needs 101 references per query, but the gallery holds 100; use eval.ks no "
                 "larger than 100",
    }


def assert_case_equal(got, want, case: str) -> None:
    if isinstance(want, (np.ndarray, str)):
        np.testing.assert_array_equal(got, want, err_msg=case)
        return
    extra = got.keys() - want.keys()  # evaluate_model also counts unreadable images: none here
    assert want.keys() <= got.keys() and extra <= {"unreadable_images"}, case
    assert all(got[key] == 0 for key in extra), case
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), (case, key)


def test_single_process_neighbours_equal_the_float64_brute_force():
    x, _ = clustered_with_duplicates(n=151)
    t, _ = exact_ties()
    got = knn_cases(None)
    np.testing.assert_array_equal(got["self_knn"], brute_force_topk(x, None, 20)[1])
    np.testing.assert_array_equal(got["qg_knn"], brute_force_topk(t[:50], t[50:], 30, "euclidean")[1])


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_evaluation_is_bit_identical_to_one_process_and_equals_brute_force(world, tmp_path):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    want = expected()
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            got = pickle.load(f)
        for case in want:
            assert_case_equal(got[case], want[case], f"rank {rank}/{world}: {case}")


def test_evaluate_model_single_process_eval_mode_autocast_and_restores_training():
    x, labels = data()
    model = AutocastRecorder().train()
    got = evaluate_model(model, loader(x, labels, np.arange(len(x))), ks=KS, metrics=METRICS, device="cpu",
                         precision="fp32")
    fp32 = brute_force_metrics(embed(model, x), labels, ks=KS, prenormalized=True, full_ranking=True)
    assert_case_equal(got, fp32, "fp32")
    assert model.training and set(model.seen) == {(False, False)}
    model.seen.clear()
    bf16 = evaluate_model(model, loader(x, labels, np.arange(len(x))), ks=KS, metrics=METRICS, device="cpu",
                          precision="bf16")
    assert set(model.seen) == {(False, True)} and model.training
    # Under bf16 autocast the (exact, see AutocastRecorder) output is rounded once to bf16: relative
    # error at most 2^-8 (8-bit significand, round to nearest), and the metrics are exactly those of
    # the rounded embeddings, which differ from the fp32 ones.
    w = model.linear.weight.detach().double().numpy()
    exact = x.astype(np.float64) @ w.T
    rounded = torch.from_numpy(exact).bfloat16().double().numpy()
    assert 0 < np.abs(rounded - exact).max() and (np.abs(rounded - exact) <= 2.0 ** -8 * np.abs(exact)).all()
    want = brute_force_metrics(embed(model, x, torch.bfloat16), labels, ks=KS, prenormalized=True, full_ranking=True)
    assert_case_equal(bf16, want, "bf16")
    assert want != fp32
