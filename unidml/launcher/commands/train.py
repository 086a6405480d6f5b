"""`unidml train --config FILE [--out DIR] [key=value ...]`: one process, torchrun or deepspeed rank."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--deepspeed", default=None, metavar="JSON",
                        help="DeepSpeed config; implies engine.backend=deepspeed")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.lr=0.01")


def run(args: argparse.Namespace) -> int:
    from unidml.config import load_config
    from unidml.engine.distributed import init_distributed, shutdown
    from unidml.engine.trainer import Trainer
    from unidml.launcher.logs import setup_logging
    from unidml.kernels import validate_loss_params

    overrides = list(args.overrides)
    if args.deepspeed:
        overrides += ["engine.backend=deepspeed", f"engine.deepspeed_config={args.deepspeed}"]
    cfg = load_config(args.config, overrides, validate_loss=validate_loss_params)
    local_rank = args.local_rank if args.local_rank is not None else getattr(args, "launcher_local_rank", None)
    env = init_distributed(cfg.engine.device, local_rank)
    setup_logging(env.rank)
    run_dir = Path(args.out or Path("runs") / Path(args.config).stem)
    # No collective teardown after a failure: peers may be gone (a killed rank), and the launcher
    # (torchrun --max-restarts) must see this process exit promptly to restart the group.
    result = Trainer(cfg, run_dir, env).fit()
    shutdown(env)
    if env.is_main and result["best"] is not None:
        best = result["best"]
        recalls = ", ".join(f"{k}={v:.2f}" for k, v in best.items() if k.startswith("recall@"))
        print(f"done: {run_dir} | best epoch {best['epoch']} ({best['selected_by']}): {recalls}")
    return 0
