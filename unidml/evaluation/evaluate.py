"""Evaluate a model: extract embeddings on every rank over its shard, then sharded retrieval metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unidml.evaluation.distributed import Collectives, process_group_active
from unidml.evaluation.knn import METRICS
from unidml.evaluation.retrieval import DEFAULT_KS, DEFAULT_METRICS, sharded_retrieval_metrics

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Embeddings:
    """Float32 embeddings (n, d) with their labels and global dataset indices, sorted by index."""

    vectors: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP's forward may sync buffers collectively, which hangs on uneven eval shards: use the module."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def extract_embeddings(model: torch.nn.Module, loader: Iterable, *, device: torch.device | str,
                       precision: str = "bf16", normalize: bool = True) -> Embeddings:
    """Embed every `(images, labels, indices)` batch of `loader` in eval mode under autocast.

    Returns float32 embeddings (L2-normalised when `normalize`), each global index once (a repeated
    index, e.g. sampler padding, keeps its first occurrence). The model's training mode is restored.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {tuple(AUTOCAST_DTYPES)}, got '{precision}'")
    device = torch.device(device)
    dtype = AUTOCAST_DTYPES[precision]
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    vectors, labels, indices = [], [], []
    try:
        for images, batch_labels, batch_indices in loader:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = net(images.to(device, non_blocking=True))
            out = out.float()
            vectors.append((F.normalize(out, dim=1) if normalize else out).cpu())
            labels.append(torch.as_tensor(batch_labels).reshape(-1).cpu())
            indices.append(torch.as_tensor(batch_indices).reshape(-1).cpu())
    finally:
        net.train(was_training)
    if not vectors:
        return Embeddings(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    idx = torch.cat(indices).numpy().astype(np.int64)
    unique, first = np.unique(idx, return_index=True)
    return Embeddings(torch.cat(vectors).numpy()[first], torch.cat(labels).numpy().astype(np.int64)[first], unique)


def _gather_all(emb: Embeddings, comm: Collectives) -> Embeddings:
    """The union of every rank's embeddings, sorted by global index, on every rank."""
    dim = np.array([emb.vectors.shape[1] if len(emb.vectors) else -1], np.int64)
    dim = int(max(d[0] for d in comm.all_gather_equal(dim)))
    vectors = emb.vectors if len(emb.vectors) else np.zeros((0, max(dim, 0)), np.float32)
    v = np.concatenate(comm.all_gather_rows(np.ascontiguousarray(vectors, np.float32)))
    labels = np.concatenate(comm.all_gather_rows(emb.labels))
    indices = np.concatenate(comm.all_gather_rows(emb.indices))
    order = np.argsort(indices, kind="stable")
    return Embeddings(v[order], labels[order], indices[order])


def _owned(emb: Embeddings, comm: Collectives) -> Embeddings:
    """This rank's items minus indices a lower rank also holds (padding of a distributed sampler)."""
    keep = comm.first_owner_mask(emb.indices)
    return Embeddings(emb.vectors[keep], emb.labels[keep], emb.indices[keep])


def evaluate_model(model: torch.nn.Module, query_loader: Iterable, gallery_loader: Iterable | None = None, *,
                   ks: Sequence[int] = DEFAULT_KS, metrics: Sequence[str] = DEFAULT_METRICS,
                   metric: str = "cosine", memory_budget_mb: float = 1024, device: torch.device | str = "cpu",
                   precision: str = "bf16") -> dict[str, float]:
    """Retrieval metrics of `model` (percent; see `retrieval_metrics` for the keys).

    Each rank iterates its own shard loader yielding `(images, labels, global indices)`. Queries are
    all-gathered; the gallery stays sharded (one FAISS index per rank) and the per-rank top-k lists
    are merged exactly, so every rank returns the same dict, equal to single-process brute force.
    `gallery_loader=None` evaluates the query set against itself. Cosine evaluation L2-normalises the
    embeddings; Euclidean uses them as they are.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
    comm = Collectives(distributed=process_group_active())
    normalize = metric == "cosine"
    local_queries = _owned(extract_embeddings(model, query_loader, device=device, precision=precision,
                                              normalize=normalize), comm)
    if gallery_loader is None:
        shard = local_queries
    else:
        shard = _owned(extract_embeddings(model, gallery_loader, device=device, precision=precision,
                                          normalize=normalize), comm)
    queries = _gather_all(local_queries, comm)
    shard_vectors = shard.vectors if len(shard.vectors) else np.zeros((0, queries.vectors.shape[1]), np.float32)
    return sharded_retrieval_metrics(queries.vectors, queries.labels, queries.indices, shard_vectors, shard.labels,
                                     shard.indices, self_retrieval=gallery_loader is None, ks=ks, metrics=metrics,
                                     metric=metric, memory_budget_mb=memory_budget_mb, device=device, comm=comm)
