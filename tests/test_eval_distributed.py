"""Model evaluation in one process and sharded over 1, 2 and 3 gloo ranks, against the torch brute force."""
from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_eval_oracle import brute_force_metrics, brute_force_topk, clustered_with_duplicates, exact_ties
from unidml.evaluation import evaluate_model, sharded_knn
from unidml.evaluation.distributed import Collectives
from unidml.evaluation.retrieval import sharded_retrieval_metrics

KS = (1, 2, 4, 16)
METRICS = ("recall", "map_at_r", "r_precision")


class AutocastRecorder(torch.nn.Module):
    """A fixed linear embedding that records whether it ran in eval mode and under which autocast."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim) + 0.1 * torch.arange(dim * dim).reshape(dim, dim).sin())
            self.linear.bias.zero_()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_autocast_enabled("cpu")))
        return self.linear(x)


def embed(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.linear(torch.from_numpy(x)).numpy()


def loader(x: np.ndarray, labels: np.ndarray, indices: np.ndarray, batch: int = 7) -> list[tuple]:
    """What an eval loader yields: (images, labels, global indices) batches."""
    return [(torch.from_numpy(x[indices[i:i + batch]]), torch.from_numpy(labels[indices[i:i + batch]]),
             torch.from_numpy(indices[i:i + batch])) for i in range(0, len(indices), batch)]


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous shard; like a padding distributed sampler, the last rank repeats index 0 and 1."""
    part = np.array_split(np.arange(n), world)[rank]
    return np.concatenate([part, [0, 1]]) if rank == world - 1 and world > 1 else part


def run_cases(rank: int, world: int) -> dict:
    """Every case, as this rank computes it (the parent compares all ranks with the oracle)."""
    comm = Collectives(distributed=True)
    out = {}
    x, labels = clustered_with_duplicates(n=151)
    xn = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
    part = np.array_split(np.arange(len(x)), world)[rank]
    top = sharded_knn(xn, np.arange(len(x)), xn[part], part, 20, self_retrieval=True, comm=comm)
    out["self_knn"] = top.ids
    out["self_metrics"] = sharded_retrieval_metrics(
        xn, labels, np.arange(len(x)), xn[part], labels[part], part, self_retrieval=True, ks=KS, metrics=METRICS,
        metric="cosine", memory_budget_mb=16.1, device="cpu", comm=comm)
    t, t_labels = exact_ties()
    gallery = np.array_split(np.arange(50, len(t)), world)[rank]
    top = sharded_knn(t[:50], np.arange(50), t[gallery], gallery - 50, 30, self_retrieval=False,
                      metric="euclidean", comm=comm)
    out["qg_knn"] = top.ids
    out["qg_metrics"] = sharded_retrieval_metrics(
        t[:50], t_labels[:50], np.arange(50), t[gallery], t_labels[gallery], gallery - 50, self_retrieval=False,
        ks=KS, metrics=METRICS, metric="euclidean", memory_budget_mb=1024, device="cpu", comm=comm)
    model = AutocastRecorder()
    idx = shard_indices(len(x), rank, world)
    out["model_self"] = evaluate_model(model, loader(x, labels, idx), ks=KS, metrics=METRICS, device="cpu",
                                       precision="fp32")
    q_idx = np.array_split(np.arange(40), world)[rank]
    g_idx = shard_indices(len(x) - 40, rank, world)
    out["model_qg"] = evaluate_model(model, loader(x, labels, q_idx), loader(x[40:], labels[40:], g_idx), ks=KS,
                                     metrics=METRICS, metric="euclidean", device="cpu", precision="fp32")
    return out


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = run_cases(rank, world)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected() -> dict:
    model = AutocastRecorder()
    x, labels = clustered_with_duplicates(n=151)
    t, t_labels = exact_ties()
    e = embed(model, x)
    return {
        "self_knn": brute_force_topk(x, None, 20)[1],
        "self_metrics": brute_force_metrics(x, labels, ks=KS),
        "qg_knn": brute_force_topk(t[:50], t[50:], 30, "euclidean")[1],
        "qg_metrics": brute_force_metrics(t[:50], t_labels[:50], t[50:], t_labels[50:], ks=KS, metric="euclidean"),
        "model_self": brute_force_metrics(e, labels, ks=KS),
        "model_qg": brute_force_metrics(e[:40], labels[:40], e[40:], labels[40:], ks=KS, metric="euclidean"),
    }


def assert_case_equal(got, want, case: str) -> None:
    if isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want, err_msg=case)
        return
    assert got.keys() == want.keys(), case
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), (case, key)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_evaluation_equals_single_process_brute_force(world, tmp_path):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    want = expected()
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            got = pickle.load(f)
        for case in want:
            assert_case_equal(got[case], want[case], f"rank {rank}/{world}: {case}")


def test_evaluate_model_single_process_eval_mode_autocast_and_restores_training():
    x, labels = clustered_with_duplicates(n=151)
    model = AutocastRecorder().train()
    got = evaluate_model(model, loader(x, labels, np.arange(len(x))), ks=KS, metrics=METRICS, device="cpu",
                         precision="fp32")
    assert_case_equal(got, brute_force_metrics(embed(model, x), labels, ks=KS), "fp32")
    assert model.training and set(model.seen) == {(False, False)}
    model.seen.clear()
    bf16 = evaluate_model(model, loader(x, labels, np.arange(len(x))), ks=(1,), metrics=METRICS, device="cpu")
    assert set(model.seen) == {(False, True)} and model.training
    assert 0.0 <= bf16["recall@1"] <= 100.0 and bf16["num_queries"] == len(x)
