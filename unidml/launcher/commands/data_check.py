"""`unidml data check`: validate a dataset tree and summarise it (exit 0 usable, 1 not)."""
from __future__ import annotations

import argparse

from unidml.data_pipeline import readers as _readers  # noqa: F401  (registers the dataset readers)
from unidml.registry import DATASETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS.names(), help="dataset layout")
    parser.add_argument("--root", default="", help="dataset root folder (optional for --dataset list: without it "
                                                     "a list may hold absolute paths anywhere)")
    parser.add_argument("--list-file", default="", help="for --dataset list: the CSV/TSV file (relative to --root "
                                                        "when given)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (default: all cores)")
    parser.add_argument("--strict", action="store_true",
                        help="also exit 1 on missing, unreadable or oversized images and on duplicates")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="largest image accepted, in pixels (as data.max_pixels; default: its default)")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from unidml.data_pipeline.check import check_dataset, format_report
    from unidml.data_pipeline.images import DEFAULT_MAX_PIXELS

    report = check_dataset(args.dataset, Path(args.root) if args.root else None, args.list_file,
                           workers=args.workers or None, progress=sys.stderr.isatty() or not args.json,
                           max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    usable = report.strict_usable if args.strict else report.usable
    return 0 if usable else 1
