"""The index written by `unidml index` with its image table, as `unidml search --index` and `unidml serve`
search it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unidml.errors import UserError


def apply_search_params(index: Any, search_params: str) -> None:
    """Set FAISS search parameters (`nprobe=16`, `efSearch=64`, ...) on `index`; a bad one is a UserError."""
    import faiss

    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as exc:
            raise UserError(f"--search-params '{search_params}': {str(exc).strip().splitlines()[-1][:160]}") from None


@dataclass
class Neighbours:
    """Top-k of one query, as `unidml.evaluation.sharded_knn` gives them: scores (higher is closer;
    negative squared distance for Euclidean) and row ids, each (1, k)."""

    scores: np.ndarray
    ids: np.ndarray


class ServedIndex:
    """An index written by `unidml index` with its image table (row i of the index is image i)."""

    def __init__(self, path: str | Path) -> None:
        import faiss

        from unidml.data_pipeline.dataset import ImageSet
        from unidml.evaluation.embedding_files import read_table, sidecars

        path = Path(path)
        info = Path(f"{path}.json")
        if not path.is_file() or not info.is_file():
            raise UserError(f"{path}: index (or its {info.name}) not found; build it with `unidml index`")
        self.meta = json.loads(info.read_text())
        self.index = faiss.read_index(str(path))
        paths, labels = read_table(sidecars(self.meta["embeddings"])[1])
        if len(paths) != self.index.ntotal:
            raise UserError(f"{path}: {self.index.ntotal} vectors but {len(paths)} rows in the embeddings' table")
        self.images = ImageSet("index", tuple(paths), labels)
        self.metric = str(self.meta["metric"])
        apply_search_params(self.index, str(self.meta.get("search_params", "")))

    def search(self, query: np.ndarray, k: int, exclude: list[int]) -> Neighbours:
        """The k nearest rows of one query vector, rows in `exclude` (the query itself) left out."""
        scores, ids = self.index.search(np.ascontiguousarray(query[:1], np.float32), k + len(exclude))
        keep = [(s, i) for s, i in zip(scores[0], ids[0]) if i >= 0 and i not in exclude][:k]
        signed = [s if self.metric == "cosine" else -s for s, _ in keep]
        return Neighbours(np.array([signed], np.float32), np.array([[i for _, i in keep]], np.int64))


def open_index(path: str | Path, metric: str) -> ServedIndex:
    """The index at `path`, refused when it was built for another similarity than the run's `metric`."""
    served = ServedIndex(path)
    if served.metric != metric:
        raise UserError(f"--index {path}: built for {served.metric} similarity, the run uses {metric}")
    return served
