"""`unidml compare --config C --losses ce,contrastive,... [--seeds 3] [--out DIR] [--set key=value ...]`.

Trains every loss with the same backbone, data, budget and seeds (one normal run directory each,
`OUT/<loss>/seed<k>/`; finished runs are kept, interrupted ones resume), then writes
`OUT/summary.md`, `OUT/summary.csv` and PNG plots. Runs one process, or every rank under torchrun.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unidml.launcher.study import DEFAULT_LOSSES

    parser.add_argument("--config", required=True, help="base YAML run config (e.g. configs/cub.yaml)")
    parser.add_argument("--losses", default=DEFAULT_LOSSES,
                        help=f"comma-separated losses; ce = cross_entropy (default: {DEFAULT_LOSSES})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per loss: train.seed = 0..N-1 (default 3)")
    parser.add_argument("--out", default=None, help="study directory (default: runs/compare_<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run (repeatable), e.g. --set train.epochs=4")
    parser.add_argument("--val-classes", type=float, default=None, metavar="FRACTION",
                        help="class-disjoint validation split carved from the training classes "
                             "(default: the config's data.val_classes, or 0.2 when it has none)")
    parser.add_argument("--select", choices=("val", "test"), default="val",
                        help="split whose Recall@1 selects each run's best epoch (default: val; test when --val-classes 0)")
    parser.add_argument("--variants", default=None, metavar="DIR",
                        help="directory of per-loss recipe variants <loss>.yaml (default: the repo's configs/pairwise)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots from OUT")


def _study_overrides(args: argparse.Namespace) -> list[str]:
    """Validation split and selection protocol first, so that the user's --set can still override them."""
    from unidml.config import load_config

    val = args.val_classes
    if val is None:
        val = float(load_config(args.config).data.val_classes) or 0.2
    protocol = [f"data.val_classes={val}"]
    protocol.append(f"eval.split={args.select}" if val > 0 else "eval.split=test")
    return protocol + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    from unidml.config import load_config
    from unidml.engine.distributed import init_distributed, shutdown
    from unidml.launcher.logs import setup_logging
    from unidml.launcher.report import write_report
    from unidml.launcher.study import describe, parse_losses, plan_study, run_state, run_study

    losses = parse_losses(args.losses)
    out = Path(args.out or Path("runs") / f"compare_{Path(args.config).stem}")
    overrides = _study_overrides(args)
    env = init_distributed(load_config(args.config, overrides).engine.device)
    setup_logging(env.rank)
    try:
        plan = plan_study(args.config, losses, args.seeds, out, overrides, args.variants, cross_rank=env.distributed)
        outcome = {} if args.report_only else run_study(plan, env)
    finally:
        shutdown(env)
    if not env.is_main:
        return 0
    first_runs = {run.loss: run for run in reversed(plan)}
    header = {"config": args.config, **describe(plan[0].cfg),
              "seeds": ", ".join(str(s) for s in range(args.seeds)),
              "overrides": " ".join(overrides),
              "losses": {loss: _loss_summary(first_runs[loss]) for loss in losses}}
    finished = [r for r in plan if run_state(r) == "done"]
    failures = [f"{r.loss} seed {r.seed}: {outcome.get((r.loss, r.seed), 'not finished')}" for r in plan if r not in finished]
    run_dirs = {loss: [r.run_dir for r in finished if r.loss == loss] for loss in losses}
    paths = write_report(out, run_dirs, header, failures)
    print(f"report: {paths['markdown']} | {paths['csv']}" + (f" | {len(failures)} run(s) without results" if failures else ""))
    return 1 if failures else 0


def _loss_summary(run) -> str:
    """`param=value, ...` of a run's loss section and its sampler, for the report header."""
    from omegaconf import OmegaConf

    params = {k: v for k, v in OmegaConf.to_container(run.cfg.loss, resolve=True).items() if k != "name"}
    sampler = run.cfg.data.sampler + (f" m={run.cfg.data.m_per_class}" if run.cfg.data.sampler == "m_per_class" else "")
    return ", ".join(f"{k}={v}" for k, v in params.items()) + f" ({sampler} sampler)"
