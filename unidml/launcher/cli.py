"""The `unidml` command line: one subcommand per module in `unidml.launcher.commands`.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`, and imports its heavy
dependencies inside `run` so that `unidml --help` stays fast. User errors (bad config, bad data,
bad checkpoint) surface as one line on stderr and exit code 2; a collective that fails because a peer
rank died surfaces as one line naming that rank and its host, exit code 1.
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
    ("embed", "embed", "write the embeddings of a split or of a folder/list of images (.npy + .tsv)"),
    ("export", "export", "export the embedding network to ONNX or TorchScript, verified against PyTorch"),
    ("index", "index", "build a FAISS index (exact or IVF/HNSW/PQ) over embeddings, with its recall"),
    ("serve", "serve", "serve an index over HTTP: a JSON search API and a page to try it"),
    ("models", "models", "list the backbones model.arch accepts (torchvision, timm/NAME) and local weights"),
    ("launch", "launch", "print or run the torchrun / deepspeed command for a cluster shape"),
    ("list", "list_registry", "list what a config can name: losses, backbones, datasets, samplers, ..."),
    ("config show", "config_show", "print the resolved config (defaults + files + overrides) as YAML"),
    ("data synth", "data_synth", "write the built-in synthetic dataset (SOP layout)"),
    ("data check", "data_check", "validate a dataset tree and summarise it"),
)


DESCRIPTION = """\
Train image embedding models for retrieval (deep metric learning) and measure them honestly.

Give it labelled images (your own class folders or CSV list, or a standard benchmark), and it trains a
network whose embeddings put images of the same class close together: with cross-entropy or a pairwise
loss (contrastive, triplet, multi-similarity, ...), on a CPU, one GPU or many. It reports Recall@K,
MAP@R and R-Precision on classes never seen in training, choosing the best epoch on a validation split.
"""
EPILOG = """\
examples:
  unidml train --config configs/quickstart.yaml            # a few minutes on a CPU, synthetic data
  unidml train --config configs/folder.yaml data.root=/data/my_images
  unidml config show --config configs/quickstart.yaml loss.name=triplet
  unidml eval --checkpoint runs/quickstart/checkpoints/best.pt
  unidml search --checkpoint runs/quickstart/checkpoints/best.pt --query photo.jpg
"""


def _version() -> str:
    """The installed package's version (`unidml/__init__.py` is its source, read by setup.py)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unidml")
    except PackageNotFoundError:
        return "(not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unidml", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"unidml {_version()}")
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
    except RuntimeError as exc:  # torch.distributed.DistBackendError included
        from unidml.runtime.peers import lost_peer

        line = lost_peer(exc)
        if line is None:
            raise
        print(f"unidml: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
