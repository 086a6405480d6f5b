"""Which FAISS a run uses (the run-start line) and one GPU resource object per device for all searches.

No GPU here: the GPU build is stood in for by patching faiss's GPU names onto the CPU build, with
the GPU index replaced by a CPU flat index, so what is tested is unidml's choice and reuse of them."""
from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
import torch

from unidml.evaluation import knn


@pytest.fixture
def fake_gpu_faiss(monkeypatch):
    """faiss with GPU names: counts StandardGpuResources objects and records which one each index gets."""
    made, used = [], []

    class Resources:
        def __init__(self):
            made.append(self)

    class Config:
        device = -1

    def gpu_index(resources, dim, config):
        used.append((resources, config.device))
        return faiss.IndexFlatIP(dim)

    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", Config, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatIP", gpu_index, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    knn.gpu_resources.cache_clear()
    yield made, used
    knn.gpu_resources.cache_clear()


def test_run_start_line_names_the_faiss_build(caplog, monkeypatch):
    if hasattr(faiss, "StandardGpuResources"):
        monkeypatch.delattr(faiss, "StandardGpuResources")
    with caplog.at_level(logging.INFO, logger="unidml.evaluation.knn"):
        knn.announce_faiss(torch.device("cpu"))
        knn.announce_faiss(torch.device("cuda", 0))
    assert caplog.messages[0] == f"FAISS {faiss.__version__} (CPU build)"
    assert caplog.messages[1].startswith(f"FAISS {faiss.__version__} (CPU build): k-NN search runs on the CPU")
    assert "replace faiss-cpu by faiss-gpu" in caplog.messages[1]


def test_run_start_line_for_a_gpu_build(caplog, fake_gpu_faiss):
    with caplog.at_level(logging.INFO, logger="unidml.evaluation.knn"):
        knn.announce_faiss(torch.device("cuda", 0))
    assert caplog.messages == [f"FAISS {faiss.__version__} (GPU build, 2 GPUs visible)"]


def test_gpu_resources_are_made_once_per_device_and_reused(fake_gpu_faiss):
    made, used = fake_gpu_faiss
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    exact = knn.ShardIndex(x, np.arange(50)).search(x[:5], 3, 2**24)
    for _ in range(3):  # three evaluations on GPU 1, one on GPU 0
        index = knn.ShardIndex(x, np.arange(50), device="cuda:1")
        assert index.on_gpu
        np.testing.assert_array_equal(index.search(x[:5], 3, 2**24).ids, exact.ids)
    knn.ShardIndex(x, np.arange(50), device="cuda:0")
    assert len(made) == 2
    assert [device for _, device in used] == [1, 1, 1, 0]
    assert used[0][0] is used[1][0] is used[2][0] and used[3][0] is not used[0][0]


def test_same_label_positions_vectorized_equal_a_per_query_loop():
    """The relevant references of each query (for the full-ranking metrics), own id left out, against
    the per-query loop they replace; uneven class sizes, queries of absent classes, shuffled ids."""
    from unidml.evaluation.retrieval import _same_label_positions

    rng = np.random.default_rng(3)
    shard_labels = rng.integers(0, 7, 60)
    ids = rng.permutation(1000)[:60]
    index = knn.ShardIndex(rng.standard_normal((60, 4)).astype(np.float32), ids)
    query_labels = np.concatenate([shard_labels[:30], [7, 8]])  # two labels the shard lacks
    query_ids = np.concatenate([ids[:30], [5000, 5001]])
    width = int(np.bincount(shard_labels).max())
    order = np.argsort(shard_labels, kind="stable")
    for exclude in (query_ids, None):
        own = index.local_positions(exclude) if exclude is not None else np.full(len(query_ids), -1)
        expected = np.full((len(query_labels), width), -1, np.int64)
        for i, label in enumerate(query_labels):
            members = order[shard_labels[order] == label]
            members = members[members != own[i]]
            expected[i, :len(members)] = members
        np.testing.assert_array_equal(_same_label_positions(shard_labels, query_labels, width, index, exclude),
                                      expected)
