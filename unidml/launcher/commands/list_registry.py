"""`unidml list losses|backbones|datasets`: what a config can name, one per line with a short description.

Losses show their parameters with defaults (set them as `loss.PARAM=value`; `help(unidml.losses.TripletLoss)`
documents each one); backbones are what `unidml models` lists (it also searches timm by pattern).
"""
from __future__ import annotations

import argparse
import inspect

WHAT = ("losses", "backbones", "datasets")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=WHAT, help="which registry to list")


def _summary(obj: object) -> str:
    return (inspect.getdoc(obj) or "").split("\n", 1)[0]


def losses() -> list[str]:
    """`loss.name` values, each with its one-line description and `param=default` list."""
    from unidml.losses import LOSSES, loss_parameters

    lines = []
    for name in sorted(LOSSES):
        signature = inspect.signature(LOSSES[name].__init__).parameters
        params = ", ".join(f"{p}={signature[p].default!r}" for p in loss_parameters(name))
        lines += [f"{name:<22}{_summary(LOSSES[name])}", f"{'':<22}{params}"]
    return lines




def datasets() -> list[str]:
    """`data.dataset` values and the layout each reads."""
    from unidml.registry import DATASETS
    from unidml.run_config import register_components

    register_components()
    return [f"{name:<22}{reader.description}" for name, reader in DATASETS.items()]


def run(args: argparse.Namespace) -> int:
    if args.what == "backbones":  # what `unidml models` prints without a pattern
        from unidml.launcher.commands import models

        return models.run(argparse.Namespace(pattern="", weights=False))
    print("\n".join({"losses": losses, "datasets": datasets}[args.what]()))
    return 0
