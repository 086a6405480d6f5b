"""Shared by the command tests: run one `unidml` subcommand in-process, write an untrained checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def command(module, argv: list[str]) -> int:
    """Exit code of subcommand `module` (a `unidml.launcher.commands` module) run on `argv`."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def write_untrained_checkpoint(root: Path, overrides: list[str]) -> Path:
    """`root/run/checkpoints/best.pt` holding a seeded untrained model and its config (data under `root/data`)."""
    from unidml.config import to_yaml
    from unidml.engine.checkpoint import save_atomic
    from unidml.models import build_model
    from unidml.run_config import load_run_config

    cfg = load_run_config(None, overrides + [f"data.root={root / 'data'}"])
    torch.manual_seed(0)
    path = root / "run" / "checkpoints" / "best.pt"
    save_atomic({"config": to_yaml(cfg), "model": build_model(cfg.model, cfg.data.image_size).state_dict()}, path)
    return path
