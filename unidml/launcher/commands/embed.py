"""`unidml embed`: embeddings of a catalogue of images with a trained checkpoint.

    unidml embed --checkpoint RUN/checkpoints/best.pt --split test --out emb.npy
    unidml embed --checkpoint RUN/checkpoints/best.pt --images DIR|LIST --out emb.npy [--chunk-size 8192]
    torchrun --nproc_per_node 4 -m unidml embed ...     # each rank embeds its share of the chunks

Writes `emb.npy` (N x d float32, in input order), `emb.tsv` (`path<TAB>label` per row, with a
header) and `emb.json` (checkpoint, dimension, whether the rows are L2-normalised, similarity).
The images go through the run's test transform and precision, exactly as evaluation embeds them;
with a cosine run the rows are L2-normalised (`--raw` keeps the network's output). `--split`
takes a split of the checkpoint's own dataset (train, test, val, query, gallery); `--images` a
folder (every image below it; label = index of its first-level sub-folder in sorted order, -1
for images directly in it) or a list file (`path[,label]` per line, relative paths from the
list's folder). Work is saved in chunks under `emb.npy.parts/`: an interrupted run continues
where it stopped when started again with the same arguments. Unreadable images are left out
(their paths are logged), so the .tsv says which image each row is.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a unidml checkpoint (e.g. RUN/checkpoints/best.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images, or list file of `path[,label]` lines")
    source.add_argument("--split", help="a split of the checkpoint's dataset: train, test, val, query, gallery")
    parser.add_argument("--out", required=True, help="embeddings .npy (the .tsv and .json are written beside it)")
    parser.add_argument("--chunk-size", type=int, default=8192, help="images per saved chunk (resume granularity)")
    parser.add_argument("--raw", action="store_true", help="do not L2-normalise (default: normalise for cosine runs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. eval.batch_size=64")


def run(args: argparse.Namespace) -> int:
    from unidml.serving.embedding_run import embed_catalogue

    summary = embed_catalogue(args.checkpoint, args.out, split=args.split, images=args.images,
                              chunk_size=args.chunk_size, raw=args.raw, overrides=args.overrides)
    if summary:
        print(summary)
    return 0
