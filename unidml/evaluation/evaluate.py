"""Evaluate a model: extract embeddings on every rank over its shard, then sharded retrieval metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from unidml.config import METRICS, RerankConfig
from unidml.errors import EvaluationError
from unidml.evaluation.distributed import Collectives
from unidml.evaluation.rerank import NO_RERANK
from unidml.evaluation.retrieval import DEFAULT_KS, DEFAULT_METRICS, sharded_retrieval_metrics
from unidml.runtime.collectives import process_group_active, rank
from unidml.runtime.precision import Precision, as_precision


@dataclass(frozen=True)
class Embeddings:
    """Float32 embeddings (n, d) with their labels and global dataset indices, sorted by index."""

    vectors: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP's forward may sync buffers collectively, which hangs on uneven eval shards: use the module."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def extract_embeddings(model: torch.nn.Module, loader: Iterable, *, device: torch.device | str,
                       precision: Precision | str = "auto", normalize: bool = True) -> Embeddings:
    """Embed every `(images, labels, indices)` batch of `loader` in eval mode under `precision`'s autocast.

    A plain `(images, labels)` loader (e.g. a torch DataLoader over an ImageFolder, in one process) is
    numbered in the order it yields. Returns float32 embeddings (L2-normalised when `normalize`), each
    global index once (a repeated index, e.g. sampler padding, keeps its first occurrence). The model's
    training mode is restored. Rank 0 shows a progress bar on a terminal.
    """
    precision = as_precision(precision, device)
    device = torch.device(device)
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    vectors, labels, indices = [], [], []
    seen = 0
    bar = tqdm(loader, desc="embedding", unit="batch", leave=False, total=_length(loader),
               disable=None if rank() == 0 else True)
    try:
        for batch in bar:
            images, batch_labels = batch[0], batch[1]
            batch_indices = batch[2] if len(batch) > 2 else torch.arange(seen, seen + len(images))
            seen += len(images)
            with precision.autocast(device):
                out = net(images.to(device, non_blocking=True))
            out = out.float()
            vectors.append((F.normalize(out, dim=1) if normalize else out).cpu())
            labels.append(torch.as_tensor(batch_labels).reshape(-1).cpu())
            indices.append(torch.as_tensor(batch_indices).reshape(-1).cpu())
    finally:
        bar.close()
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


def unreadable_count(loaders: Sequence[Iterable], comm: Collectives) -> int:
    """Images the loaders left out as unreadable in their last pass (`EvalLoader.unreadable`), summed
    over the ranks (their shards are disjoint); a loader without that record left none out."""
    return _total(sum(len(getattr(loader, "unreadable", {})) for loader in loaders), comm)


def _total(count: int, comm: Collectives) -> int:
    return int(np.sum(comm.all_gather_equal(np.array([count], np.int64))))


def _check_sizes(queries: int, gallery: int | None, unreadable: int) -> None:
    """One line when too few images are left to rank anything (`gallery=None`: self-retrieval)."""
    if queries >= (2 if gallery is None else 1) and (gallery is None or gallery >= 1):
        return
    found = f"{queries} query" + (f" and {gallery} gallery" if gallery is not None else "")
    need = "at least 2 images (each query needs another one)" if gallery is None else "a query and a gallery image"
    raise EvaluationError(f"evaluation: {found} images readable ({unreadable} unreadable left out); "
                          f"evaluation needs {need}")


def evaluate_model(model: torch.nn.Module, query_loader: Iterable, gallery_loader: Iterable | None = None, *,
                   ks: Sequence[int] = DEFAULT_KS, metrics: Sequence[str] = DEFAULT_METRICS,
                   metric: str = "cosine", memory_budget_mb: float = 1024, device: torch.device | str = "cpu",
                   precision: Precision | str = "auto",
                   names: tuple[str, str] = ("the query", "the gallery"),
                   rerank: RerankConfig = NO_RERANK) -> dict[str, float]:
    """Retrieval metrics of `model` (percent; see `retrieval_metrics` for the keys).

    Each rank iterates its own shard loader yielding `(images, labels, global indices)`. Queries are
    all-gathered; the gallery stays sharded (one FAISS index per rank) and the per-rank top-k lists
    are merged exactly, so every rank returns the same dict, equal to single-process brute force.
    `gallery_loader=None` evaluates the query set against itself. Cosine evaluation L2-normalises the
    embeddings; Euclidean uses them as they are. Images a loader could not read are neither queries
    nor references (never substituted); `unreadable_images` counts them. Non-finite embeddings stop
    with one line naming the set (`names`, e.g. "split 'test'"). `rerank`: the re-ranking of the
    neighbour lists (`evaluation.rerank`), the same for any shard count.
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
    loaders = [query_loader] if gallery_loader is None else [query_loader, gallery_loader]
    unreadable = unreadable_count(loaders, comm)
    _check_sizes(len(queries.indices), None if gallery_loader is None else _total(len(shard.indices), comm), unreadable)
    shard_vectors = shard.vectors if len(shard.vectors) else np.zeros((0, queries.vectors.shape[1]), np.float32)
    result = sharded_retrieval_metrics(queries.vectors, queries.labels, queries.indices, shard_vectors, shard.labels,
                                       shard.indices, self_retrieval=gallery_loader is None, ks=ks, metrics=metrics,
                                       metric=metric, memory_budget_mb=memory_budget_mb, device=device, comm=comm,
                                       names=names, rerank=rerank)
    return {**result, "unreadable_images": unreadable}
