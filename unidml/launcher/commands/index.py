"""`unidml index`: a FAISS index over the embeddings written by `unidml embed`, for `unidml search --index`.

    unidml index --embeddings emb.npy --out catalogue.index                       # exact (Flat)
    unidml index --embeddings emb.npy --out catalogue.index --factory IVF256,Flat --search-params nprobe=16
    unidml index --embeddings emb.npy --out catalogue.index --factory HNSW32 --search-params efSearch=64

`--factory` is a FAISS index-factory string (Flat, IVFn,Flat, IVFn,PQm, HNSWm, ...). An approximate
index is trained on the embeddings themselves, and its recall@10 against exact search is measured
on up to --recall-queries of the indexed vectors (each query's exact top 10, itself included, vs
the index's top 10) and printed. Cosine runs use inner product on L2-normalised vectors, Euclidean
runs squared L2. Row i of the index is row i of the embeddings file; `INDEX.json` beside the index
records the embeddings file (whose .tsv gives each row's image), metric, factory, search
parameters and the measured recall.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from unidml.config import METRICS
from unidml.errors import UserError
from unidml.serving.catalogue import apply_search_params

RECALL_K = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, help="an `unidml embed` .npy (with its .tsv and .json)")
    parser.add_argument("--out", required=True, help="index file to write (INDEX.json is written beside it)")
    parser.add_argument("--factory", default="Flat", help="FAISS index-factory string (default: Flat, exact)")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="similarity (default: the embedding run's eval.metric)")
    parser.add_argument("--search-params", default="", metavar="NAME=VALUE[,...]",
                        help="FAISS search parameters stored with the index, e.g. nprobe=16 or efSearch=64")
    parser.add_argument("--recall-queries", type=int, default=1000, help="queries for the recall measurement")


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


def run(args: argparse.Namespace) -> int:
    import faiss

    from unidml.evaluation.embedding_files import read_embeddings, sidecars

    if args.recall_queries <= 0:
        raise UserError(f"--recall-queries must be > 0, got {args.recall_queries}")
    raw, _, _, meta = read_embeddings(args.embeddings)
    metric = args.metric or str(meta.get("metric", "cosine"))
    vectors = prepared(raw, metric)
    start = time.perf_counter()
    index = build_index(vectors, args.factory, metric, args.search_params)
    built = time.perf_counter() - start
    exact = args.factory.strip() == "Flat"
    recall = 1.0 if exact else recall_against_exact(index, vectors, metric, args.recall_queries)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out))
    record = {"embeddings": str(sidecars(args.embeddings)[0].resolve()), "metric": metric, "factory": args.factory,
              "search_params": args.search_params, "count": int(index.ntotal), "dim": int(vectors.shape[1]),
              f"recall@{RECALL_K}_vs_exact": recall}
    Path(f"{out}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.factory} index of {index.ntotal} x {vectors.shape[1]} ({metric}) written to {out} in {built:.2f} s")
    queries = min(args.recall_queries, len(vectors))
    print("exact search: recall@10 = 1 by construction" if exact else
          f"recall@{RECALL_K} vs exact search: {recall:.4f} ({queries} queries"
          f"{', ' + args.search_params if args.search_params else ''})")
    return 0
