"""`unidml train --config FILE [--config MORE ...] [--out DIR] [key=value ...]`: one process, torchrun or
deepspeed rank.

Several --config files compose left to right (a later file overrides an earlier one), then the
overrides apply. The run prints a start-up summary (splits, device, data backend, protocol), a line per
evaluation and a final line with the test metrics at the selected epoch; `RUN_DIR/train.log` keeps them.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("unidml.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, action="append", metavar="FILE",
                        help="YAML run config (see configs/); repeat to compose files left to right")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<name of the last config>)")
    parser.add_argument("--deepspeed", default=None, metavar="JSON",
                        help="DeepSpeed config; implies engine.backend=deepspeed")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.lr=0.01; `~key` deletes a key")


def startup_summary(trainer) -> str:
    """One line: the dataset and its splits, the device and world size, the data backend, the protocol."""
    from unidml.data_pipeline.build import resolve_backend

    cfg, dataset = trainer.cfg, trainer.dataset
    splits = ", ".join(f"{name} {len(images)} images / {images.num_classes} classes"
                       for name, images in dataset.splits.items())
    processes = f", {trainer.env.world_size} processes ({cfg.engine.backend})" if trainer.env.world_size > 1 else ""
    return (f"run: {cfg.data.dataset} at {dataset.root}: {splits} | device {trainer.device}{processes} | "
            f"data backend {resolve_backend(str(cfg.data.backend))} | model {cfg.model.arch}, loss {cfg.loss.name} | "
            f"best epoch selected on {trainer.evaluator.selection} recall@1")


def final_line(run_dir: Path, best: dict) -> str:
    """The selected epoch, the score that selected it, and the test metrics at that epoch."""
    from unidml.engine.run_record import query_counts

    selected = best["selected_by"]
    split = selected.split()[0]
    test = best["splits"].get("test", best)
    recalls = ", ".join(f"{k}={v:.2f}" for k, v in test.items() if k.startswith("recall@"))
    label = "test" if split == "test" else "test at that epoch"
    return (f"done: {run_dir} | best epoch {best['epoch']} (selected on {selected}={best['recall@1']:.2f}) | "
            f"{label}: {recalls} {query_counts(test)}")


def run(args: argparse.Namespace) -> int:
    from unidml.engine.distributed import init_distributed, shutdown
    from unidml.engine.trainer import Trainer
    from unidml.launcher.logs import setup_logging
    from unidml.launcher.summary import run_summary
    from unidml.run_config import load_run_config

    started = time.perf_counter()
    overrides = list(args.overrides)
    if args.deepspeed:
        overrides += ["engine.backend=deepspeed", f"engine.deepspeed_config={args.deepspeed}"]
    cfg = load_run_config(args.config, overrides)
    local_rank = args.local_rank if args.local_rank is not None else getattr(args, "launcher_local_rank", None)
    env = init_distributed(cfg.engine.device, local_rank)
    setup_logging(env.rank)
    run_dir = Path(args.out or Path("runs") / Path(args.config[-1]).stem)
    trainer = Trainer(cfg, run_dir, env)
    if env.is_main:
        log.info("%s", startup_summary(trainer))
    # No collective teardown after a failure: peers may be gone (a killed rank), and the launcher
    # (torchrun --max-restarts) must see this process exit promptly to restart the group.
    result = trainer.fit()
    shutdown(env)
    if env.is_main and result["best"] is not None:
        print(run_summary(json.loads((run_dir / "metrics.json").read_text()), time.perf_counter() - started))
        line = final_line(run_dir, result["best"])
        print(line)
        with open(run_dir / "train.log", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return 0
