"""`unidml models [PATTERN] [--weights]`: the backbones `model.arch` accepts.

    unidml models                      # torchvision ResNets, and how many timm models are available
    unidml models 'timm/vit_small*'    # matching architectures (shell pattern; 'vit_*' also matches timm/vit_*)
    unidml models 'vit_small*' --weights   # with their pretrained tags and whether the weights are on disk

Every name listed can be built with `model.arch=NAME`; weights are never downloaded (see `model.pretrained`).
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="", help="shell-style pattern, e.g. 'timm/convnext_*' or 'vit_*'")
    parser.add_argument("--weights", action="store_true",
                        help="list timm pretrained tags and where their weights are (or would be) on disk")


def _weight_lines(names: list[str]) -> list[str]:
    """One line per timm pretrained tag of `names`: the cached file, or where it was looked for."""
    import timm

    from unidml.models.timm_backbones import weight_candidates

    lines = []
    for name in names:
        arch = name.removeprefix("timm/")
        for tagged in timm.list_pretrained(f"{arch}.*"):
            found, places = weight_candidates(arch, tagged.split(".", 1)[1])
            where = f"on disk: {found}" if found else f"not on disk (looked in {', '.join(map(str, places))})"
            lines.append(f"timm/{tagged}  {where}")
    return lines


def run(args: argparse.Namespace) -> int:
    from unidml.errors import UserError
    from unidml.models import list_models

    names = list_models(args.pattern)
    if not args.pattern:
        torchvision = [n for n in names if not n.startswith("timm/")]
        print("\n".join(torchvision))
        timm_count = len(names) - len(torchvision)
        print(f"... and {timm_count} timm models as timm/NAME (`unidml models 'timm/vit_*'` lists a family)"
              if timm_count else "(timm is not installed: pip install 'unidml[timm]' for ViT, ConvNeXt, ...)")
        return 0
    if not names:
        raise UserError(f"no backbone matches '{args.pattern}'")
    print("\n".join(_weight_lines([n for n in names if n.startswith("timm/")]) if args.weights else names))
    return 0
