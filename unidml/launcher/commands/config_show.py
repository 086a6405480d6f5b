"""`unidml config show [--config FILE ...] [key=value ...]`: print the resolved run config as YAML.

The schema defaults, then each --config file in order (a later file overrides an earlier one), then the
overrides; exactly what `unidml train` with the same arguments would store in the run's config.yaml.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML run config; repeat to compose files left to right (default: the schema defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides (e.g. train.lr=0.01), `~key` to delete a key")


def run(args: argparse.Namespace) -> int:
    from unidml.config import to_yaml
    from unidml.run_config import load_run_config

    cfg = load_run_config(args.config or None, list(args.overrides))
    print(to_yaml(cfg), end="")
    return 0
