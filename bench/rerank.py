"""Benchmark: Recall@1 and MAP@R with and without each re-ranking (`eval.rerank`), and the time each takes.

    python bench/rerank.py --embeddings emb/test.npy                # `unidml embed` output, self-retrieval
    python bench/rerank.py --synthetic [--classes 12000] [--per-class 5] [--dim 512] [--noise 2.5]

Synthetic data: `classes` unit centres drawn uniformly on the sphere, `per-class` points each (centre plus
Gaussian noise of norm about `noise`, then L2-normalised), self-retrieval. Every method runs in this
process on the default parameters of `unidml.config.RerankConfig` (or those given); the time is wall
seconds of the whole evaluation (exact search, re-ranking, metrics). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from unidml.config import RERANKS, RerankConfig
from unidml.evaluation import retrieval_metrics
from unidml.evaluation.rerank import describe


def synthetic(classes: int, per_class: int, dim: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around uniform random unit centres, L2-normalised float32 rows and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(classes), per_class)
    x = centres[labels] + rng.standard_normal((len(labels), dim)).astype(np.float32) * (noise / np.sqrt(dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="an `unidml embed` .npy (with its .tsv)")
    source.add_argument("--synthetic", action="store_true", help="generated clusters on the sphere")
    parser.add_argument("--classes", type=int, default=12000)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=2.5)
    parser.add_argument("--methods", nargs="+", choices=RERANKS, default=list(RERANKS))
    parser.add_argument("--memory-budget-mb", type=float, default=1024)
    parser.add_argument("params", nargs="*", metavar="key=value", help="RerankConfig fields, e.g. top_n=3")
    args = parser.parse_args()
    if args.synthetic:
        x, labels = synthetic(args.classes, args.per_class, args.dim, args.noise)
        what = f"synthetic: {args.classes} classes x {args.per_class}, dim {args.dim}, noise {args.noise}"
    else:
        from unidml.launcher.commands.embed import read_embeddings

        x, labels, _, _ = read_embeddings(args.embeddings)
        what = f"{args.embeddings}: {len(x)} x {x.shape[1]}"
    params = {key: type(getattr(RerankConfig(), key))(value) for key, value in (p.split("=", 1) for p in args.params)}
    print(f"{what}, self-retrieval\n")
    print("| re-ranking | parameters | R@1 | MAP@R | seconds |\n|---|---|---:|---:|---:|")
    for name in args.methods:
        rerank = RerankConfig(**{**params, "name": name})
        start = time.perf_counter()
        metrics = retrieval_metrics(x, labels, ks=(1,), metrics=("recall", "map_at_r"), rerank=rerank,
                                    memory_budget_mb=args.memory_budget_mb)
        seconds = time.perf_counter() - start
        shown = ", ".join(f"{k}={v}" for k, v in describe(rerank).items() if k != "name") or "-"
        print(f"| {name} | {shown} | {metrics['recall@1']:.2f} | {metrics['map@r']:.2f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
