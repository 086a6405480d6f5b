"""The embeddings file `unidml embed` writes and `unidml eval --embeddings`, `unidml index` and the
served index read: `NAME.npy` (N x d float32), `NAME.tsv` (`path<TAB>label` per row, with a header)
and `NAME.json` (metadata: checkpoint, dimension, metric, whether rows are L2-normalised)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from unidml.errors import UserError


def sidecars(path: str | Path) -> tuple[Path, Path, Path]:
    """(.npy, .tsv, .json) of an embeddings file given with or without its .npy suffix."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix == ".npy" else path
    return base.with_suffix(".npy"), base.with_suffix(".tsv"), base.with_suffix(".json")


def write_embeddings(path: str | Path, vectors: np.ndarray, paths: list[str], labels: np.ndarray,
                     meta: dict[str, Any]) -> Path:
    """Write the .npy, .tsv and .json of an embeddings file, each atomically; return the .npy path."""
    npy, tsv, info = sidecars(path)
    npy.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{npy}.tmp", "wb") as handle:
        np.save(handle, np.ascontiguousarray(vectors, np.float32))
    with open(f"{tsv}.tmp", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows(zip(paths, (int(v) for v in labels)))
    Path(f"{info}.tmp").write_text(json.dumps({**meta, "count": len(paths), "dim": int(vectors.shape[1])},
                                              indent=2) + "\n")
    for final in (npy, tsv, info):
        os.replace(f"{final}.tmp", final)
    return npy


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(vectors (N, d) float32, labels (N,) int64, image paths, metadata) of an embeddings file."""
    npy, tsv, info = sidecars(path)
    if not npy.is_file():
        raise UserError(f"{npy}: embeddings file not found")
    try:
        vectors = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{npy}: not a readable .npy file ({exc})") from None
    paths, labels = read_table(tsv)
    if vectors.ndim != 2 or len(paths) != len(vectors):
        raise UserError(f"{npy}: {vectors.shape} array does not match the {len(paths)} rows of {tsv}")
    meta = json.loads(info.read_text()) if info.is_file() else {}
    return vectors.astype(np.float32, copy=False), labels, paths, meta


def read_table(tsv: Path) -> tuple[list[str], np.ndarray]:
    """(image paths, labels) of an embeddings file's .tsv."""
    if not tsv.is_file():
        raise UserError(f"{tsv}: the embeddings' path/label table is missing (written by `unidml embed`)")
    with open(tsv, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))[1:]
    if any(len(r) != 2 or not r[1].lstrip("-").isdigit() for r in rows):
        raise UserError(f"{tsv}: expected 'path<TAB>label' rows with integer labels")
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows], np.int64)
