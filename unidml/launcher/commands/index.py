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
from pathlib import Path

from unidml.config import METRICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, help="an `unidml embed` .npy (with its .tsv and .json)")
    parser.add_argument("--out", required=True, help="index file to write (INDEX.json is written beside it)")
    parser.add_argument("--factory", default="Flat", help="FAISS index-factory string (default: Flat, exact)")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="similarity (default: the embedding run's eval.metric)")
    parser.add_argument("--search-params", default="", metavar="NAME=VALUE[,...]",
                        help="FAISS search parameters stored with the index, e.g. nprobe=16 or efSearch=64")
    parser.add_argument("--recall-queries", type=int, default=1000, help="queries for the recall measurement")


def run(args: argparse.Namespace) -> int:
    from unidml.serving.indexes import RECALL_K, write_index

    out = Path(args.out)
    built = write_index(args.embeddings, out, args.factory, args.metric, args.search_params, args.recall_queries)
    print(f"{args.factory} index of {built.count} x {built.dim} ({built.metric}) written to {out} in "
          f"{built.seconds:.2f} s")
    queries = min(args.recall_queries, built.count)
    print("exact search: recall@10 = 1 by construction" if built.exact else
          f"recall@{RECALL_K} vs exact search: {built.recall:.4f} ({queries} queries"
          f"{', ' + args.search_params if args.search_params else ''})")
    return 0
