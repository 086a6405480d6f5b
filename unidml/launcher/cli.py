"""The `unidml` command line: one subcommand per module in `unidml.launcher.commands`.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`, and imports its heavy
dependencies inside `run` so that `unidml --help` stays fast. User errors (bad config, bad data,
bad checkpoint) surface as one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from unidml.errors import UserError

# (command path, module, one-line help); a two-word path is a subcommand of a group.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("train", "train", "train an embedding network from a YAML config"),
    ("eval", "evaluate", "evaluate a checkpoint: Recall@K, MAP@R, R-Precision"),
    ("compare", "compare", "train CE and pairwise losses side by side and tabulate them"),
    ("search", "search", "retrieve the nearest gallery images of a query image (contact sheet PNG)"),
    ("launch", "launch", "print or run the torchrun / deepspeed command for a cluster shape"),
    ("data synth", "data_synth", "write the built-in synthetic dataset (SOP layout)"),
    ("data check", "data_check", "validate a dataset tree and summarise it"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unidml", description=__doc__.splitlines()[0])
    # The deepspeed launcher puts `--local_rank=N` before the subcommand (`python -m unidml --local_rank=0 train ...`).
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module_name, help_text in COMMANDS:
        words = path.split()
        target = top
        if len(words) == 2:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} tools")
                groups[words[0]] = group.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            target = groups[words[0]]
        sub = target.add_parser(words[-1], help=help_text, description=help_text)
        module = importlib.import_module(f"unidml.launcher.commands.{module_name}")
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow options (`train --deepspeed X train.lr=0.1`).
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"unidml: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
