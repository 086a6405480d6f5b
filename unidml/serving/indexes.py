"""FAISS indexes over embeddings (`unidml index`, `unidml search --index`, `unidml serve`): build one from an
index-factory string, measure its recall against exact search, write it with its `INDEX.json` record.

Cosine runs use inner product on L2-normalised vectors, Euclidean runs squared L2; row i of the index is
row i of the embeddings file.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unidml.errors import UserError
from unidml.serving.catalogue import apply_search_params

RECALL_K = 10


def metric_type(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def prepared(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Contiguous float32 rows, L2-normalised for cosine (inner product on unit vectors)."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    if metric == "cosine":
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def build_index(vectors: np.ndarray, factory: str, metric: str, search_params: str = "") -> Any:
    """A trained FAISS index over `vectors` (already `prepared`), with `search_params` applied."""
    import faiss

    try:
        index = faiss.index_factory(vectors.shape[1], factory, metric_type(metric))
    except RuntimeError as exc:
        raise UserError(f"--factory '{factory}': not a FAISS index-factory string for d={vectors.shape[1]} "
                        f"({str(exc).strip().splitlines()[-1][:160]})") from None
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    apply_search_params(index, search_params)
    return index


def recall_against_exact(index: Any, vectors: np.ndarray, metric: str, queries: int, k: int = RECALL_K) -> float:
    """Mean |index top-k ∩ exact top-k| / k over up to `queries` indexed vectors (fixed random sample)."""
    import faiss

    rows = np.random.default_rng(0).choice(len(vectors), size=min(queries, len(vectors)), replace=False)
    k = min(k, len(vectors))
    exact = faiss.IndexFlat(vectors.shape[1], metric_type(metric))
    exact.add(vectors)
    _, truth = exact.search(vectors[rows], k)
    _, found = index.search(vectors[rows], k)
    return float(np.mean([len(set(t) & set(f[f >= 0])) / k for t, f in zip(truth, found)]))


@dataclass(frozen=True)
class IndexSummary:
    """What `write_index` built: its size, the time the build took and its measured recall@10."""

    count: int
    dim: int
    metric: str
    seconds: float
    recall: float
    exact: bool


def write_index(embeddings: str, out: Path, factory: str, metric: str | None, search_params: str,
                recall_queries: int) -> IndexSummary:
    """Build the `factory` index over the `unidml embed` file `embeddings` (metric: the embedding run's
    when None), write it to `out` and its record to `out.json`."""
    import faiss

    from unidml.evaluation.embedding_files import read_embeddings, sidecars

    if recall_queries <= 0:
        raise UserError(f"--recall-queries must be > 0, got {recall_queries}")
    raw, _, _, meta = read_embeddings(embeddings)
    metric = metric or str(meta.get("metric", "cosine"))
    vectors = prepared(raw, metric)
    start = time.perf_counter()
    index = build_index(vectors, factory, metric, search_params)
    built = time.perf_counter() - start
    exact = factory.strip() == "Flat"
    recall = 1.0 if exact else recall_against_exact(index, vectors, metric, recall_queries)
    out.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out))
    record = {"embeddings": str(sidecars(embeddings)[0].resolve()), "metric": metric, "factory": factory,
              "search_params": search_params, "count": int(index.ntotal), "dim": int(vectors.shape[1]),
              f"recall@{RECALL_K}_vs_exact": recall}
    Path(f"{out}.json").write_text(json.dumps(record, indent=2) + "\n")
    return IndexSummary(int(index.ntotal), int(vectors.shape[1]), metric, built, recall, exact)
