"""`unidml data check`: validate a dataset tree and summarise it (exit 0 usable, 1 not)."""
from __future__ import annotations

import argparse

DATASETS = ("sop", "inshop", "cub", "cars", "list", "folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="dataset layout")
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument("--list-file", default="", help="for --dataset list: the CSV/TSV file (relative to root)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (default: all cores)")
    parser.add_argument("--strict", action="store_true", help="also exit 1 on missing or unreadable images")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from unidml.data_pipeline.check import check_dataset, format_report

    report = check_dataset(args.dataset, Path(args.root), args.list_file, workers=args.workers or None,
                           progress=sys.stderr.isatty() or not args.json)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    usable = report.usable and not (args.strict and report.problems)
    return 0 if usable else 1
