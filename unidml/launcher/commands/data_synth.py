"""`unidml data synth`: write the built-in synthetic dataset (SOP layout) to a directory."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="dataset root to create (Ebay_train.txt, Ebay_test.txt, images/)")
    parser.add_argument("--classes", type=int, default=100, help="number of classes, train and test together")
    parser.add_argument("--per-class", type=int, default=40, help="images per class")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="generator seed; same arguments give identical files")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="fraction of classes in the test split")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from unidml.data_pipeline.synthetic import SynthParams, generate_dataset

    start = time.perf_counter()
    root = generate_dataset(Path(args.out), classes=args.classes, per_class=args.per_class, size=args.size,
                            seed=args.seed, test_fraction=args.test_fraction)
    params = SynthParams(args.classes, args.per_class, args.size, args.seed, args.test_fraction)
    print(f"synthetic dataset: train {params.train_classes} classes / {params.train_classes * args.per_class} images, "
          f"test {params.test_classes} classes / {params.test_classes * args.per_class} images, "
          f"{args.size}px, at {root} ({time.perf_counter() - start:.1f}s)")
    return 0
