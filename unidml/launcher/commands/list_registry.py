"""`unidml list losses|backbones|datasets|samplers|poolings|data-backends|engine-backends|export-formats`:
what a config (or `unidml export --format`) can name, one per line, straight from the registries.

Losses show their parameters with defaults (set them as `loss.PARAM=value`; `help(unidml.losses.TripletLoss)`
documents each one); backbones are what `unidml models` lists (it also searches timm by pattern); datasets
show the layout each reads.
"""
from __future__ import annotations

import argparse
import inspect

# The registries listed by name only: `unidml list WHAT` -> (registry attribute, the config key or option).
NAMED = {"samplers": ("SAMPLERS", "data.sampler"), "poolings": ("POOLINGS", "model.pooling"),
         "data-backends": ("DATA_BACKENDS", "data.backend"), "engine-backends": ("ENGINE_BACKENDS", "engine.backend"),
         "export-formats": ("EXPORT_FORMATS", "unidml export --format")}
WHAT = ("losses", "backbones", "datasets", *NAMED)


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


def named(what: str) -> list[str]:
    """The names of a registry, each with the key or option that takes it."""
    from unidml import registry
    from unidml.run_config import register_components
    from unidml.serving import export  # noqa: F401  (registers the export formats)

    register_components()
    attribute, key = NAMED[what]
    names = registry.choices(key) if key in registry.CONFIG_CHOICES else getattr(registry, attribute).names()
    return [f"{name:<22}{key}={name}" if "." in key else f"{name:<22}{key} {name}" for name in names]


def run(args: argparse.Namespace) -> int:
    if args.what == "backbones":  # what `unidml models` prints without a pattern
        from unidml.launcher.commands import models

        return models.run(argparse.Namespace(pattern="", weights=False))
    lines = named(args.what) if args.what in NAMED else {"losses": losses, "datasets": datasets}[args.what]()
    print("\n".join(lines))
    return 0
