"""Shared by the command tests: run one `unidml` subcommand in-process, write an untrained checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

# A run small enough for command tests on a CPU: 6 synthetic classes of 32 x 32 images, an untrained ResNet-18.
TINY_RUN = ["data.synthetic.classes=6", "data.synthetic.per_class=5", "data.synthetic.size=32",
            "data.image_size=32", "data.resize_size=32", "data.num_workers=0", "data.backend=torchvision",
            "model.arch=resnet18", "model.pretrained=''", "eval.ks=[1,2,4]", "eval.batch_size=4",
            "engine.precision=fp32", "engine.device=cpu", "data.val_classes=0", "eval.split=test"]


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
