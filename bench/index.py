"""FAISS indexes of `unidml index` on clustered unit vectors: recall@10 vs exact, build and query time vs Flat.

    python bench/index.py [--n 20000] [--dim 64] [--queries 1000]

The Flat (exact) index measured in the same run is the baseline of the time ratios.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from unidml.serving.indexes import build_index, recall_against_exact

FACTORIES = (("Flat", ""), ("IVF256,Flat", "nprobe=4"), ("IVF256,Flat", "nprobe=16"), ("HNSW32", "efSearch=64"),
             ("IVF256,PQ16", "nprobe=16"))


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim))
    vectors = (centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim))).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    vectors = clustered(args.n, args.dim)
    queries = vectors[np.random.default_rng(1).choice(args.n, size=args.queries, replace=False)]
    baseline = None
    print(f"{args.n} x {args.dim} vectors, {args.queries} queries, top 10")
    print(f"{'factory':<14}{'params':<14}{'recall@10':>10}{'build s':>9}{'query ms':>10}{'query vs Flat':>15}")
    for factory, params in FACTORIES:
        start = time.perf_counter()
        index = build_index(vectors, factory, "cosine", params)
        built = time.perf_counter() - start
        start = time.perf_counter()
        index.search(queries, 10)
        per_query = (time.perf_counter() - start) / args.queries * 1e3
        baseline = baseline or per_query
        recall = recall_against_exact(index, vectors, "cosine", args.queries)
        print(f"{factory:<14}{params:<14}{recall:>10.4f}{built:>9.2f}{per_query:>10.4f}{per_query / baseline:>14.2f}x")


if __name__ == "__main__":
    main()
