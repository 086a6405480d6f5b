"""`unidml compare --config C --losses ce,contrastive,... [--trials N] [--seeds S] [--out DIR] [--set key=value ...]`.

Compares losses on one backbone, data and budget. With `--trials N`, each loss is first tuned: N
trials, the first at the recipe variant's own setting and the others drawn by Optuna's TPE from the
loss's search space (`search:` in the variant), each a run scored on the class-disjoint validation
split, median-pruned per epoch from half its epochs on; the best setting is then retrained with
seeds 0..S-1 and reported on test, beside two references (the untrained network, raw pixels).
Without `--trials`, every loss trains at its recipe variant's settings. Runs are ordinary run
directories under OUT; the study database (`--storage`, SQLite under OUT by default) lets an
interrupted study resume and several workers (processes, nodes, torchrun jobs) share it: start the
same command once per worker. Writes `OUT/summary.md`, CSV tables and PNG plots. With `log.trackers`
naming MLflow or W&B, every trial and retraining is a run of the study's group there (`unidml.study.tracking`).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unidml.study.compare import DEFAULT_LOSSES, OBJECTIVES

    parser.add_argument("--config", required=True, help="base YAML run config (e.g. configs/cub.yaml)")
    parser.add_argument("--losses", default=DEFAULT_LOSSES,
                        help=f"comma-separated losses; ce = cross_entropy (default: {DEFAULT_LOSSES})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per loss: train.seed = 0..N-1 (default 3)")
    parser.add_argument("--trials", type=int, default=0,
                        help="tuning trials per loss on the validation split (default 0: no tuning)")
    parser.add_argument("--trial-epochs", type=int, default=None, metavar="E",
                        help="epochs of each tuning trial (default: the config's train.epochs); "
                             "retraining uses train.epochs")
    parser.add_argument("--objective", choices=OBJECTIVES, default="recall@1",
                        help="validation metric the tuning maximises and retrainings select their epoch by "
                             "(default recall@1)")
    parser.add_argument("--no-prune", dest="prune", action="store_false", help="never stop a trial early")
    parser.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="SQLAlchemy URL of the study database (default: sqlite:///OUT/study.db)")
    parser.add_argument("--study-name", default="compare", help="name of the study in the database (default compare)")
    parser.add_argument("--stale-after", type=float, default=600.0, metavar="SECONDS",
                        help="a task whose worker sent no heartbeat for this long is taken over (default 600)")
    parser.add_argument("--poll-seconds", type=float, default=10.0, metavar="SECONDS",
                        help="how often a worker with nothing to do checks for new work (default 10)")
    parser.add_argument("--out", default=None, help="study directory (default: runs/compare_<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run (repeatable), e.g. --set train.epochs=4")
    parser.add_argument("--val-classes", type=float, default=None, metavar="FRACTION",
                        help="class-disjoint validation split carved from the training classes "
                             "(default: the config's data.val_classes, or 0.2 when it has none)")
    parser.add_argument("--select", choices=("val", "test"), default="val",
                        help="split that selects each retraining's reported epoch "
                             "(default: val; test when --val-classes 0)")
    parser.add_argument("--variants", default=None, metavar="DIR",
                        help="directory of per-loss recipe variants <loss>.yaml (default: the repo's configs/pairwise)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots from OUT")


def _study_overrides(args: argparse.Namespace) -> tuple[list[str], str]:
    """Validation split and selection protocol first, so that the user's --set can still override them."""
    from unidml.errors import UserError
    from unidml.run_config import load_run_config

    val = args.val_classes
    if val is None:
        val = float(load_run_config(args.config).data.val_classes) or 0.2
    select = args.select if val > 0 else "test"
    if args.trials and select != "val":
        raise UserError("--trials: tuning needs the validation split (--val-classes > 0 and --select val)")
    return [f"data.val_classes={val}", f"eval.split={select}", *args.overrides], select


def _check_counts(args: argparse.Namespace) -> None:
    from unidml.errors import UserError

    for name in ("seeds", "trials", "trial_epochs"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "trials" else 0):
            raise UserError(f"--{name.replace('_', '-')}: must be >= {1 if name != 'trials' else 0}, got {value}")


def protocol_text(settings, select: str, epochs: int) -> str:
    """The study's protocol in words, for the report."""
    s = settings
    seeds = f"seeds 0..{s.seeds - 1}" if s.seeds > 1 else "seed 0"
    report = f"each retraining reports test metrics at its trained epoch (>= 1) with the best {select} {s.objective}"
    if not s.trials:
        return (f"No tuning: every loss trains at its recipe variant's settings for {epochs} epochs with {seeds}; "
                f"{report}.")
    trial_epochs = s.trial_epochs or epochs
    prune = (f"a trial is stopped at epoch e >= {s.prune_after(trial_epochs)} ({s.prune_warmup_share:.0%} of its "
             f"{trial_epochs} epochs: runs dip early and recover) when its best val score so far is below the median "
             f"of the completed trials at e (after {s.prune_startup_trials} completed trials)")
    prune = prune if s.prune else "no pruning"
    return (f"Every loss gets the same tuning budget: {s.trials} trials of {trial_epochs} epochs "
            f"(train.seed {s.trial_seed}), each trained on the training classes and scored on the class-disjoint "
            f"validation split only (the test split is not evaluated while tuning); a trial's score is its best "
            f"trained epoch's val {s.objective}. Trial 0 trains the loss's recipe setting (its variant's value at "
            f"every searched key); the other trials' values are drawn from the loss's search space by Optuna's TPE "
            f"(sampler seed {s.seed}; random draws until {s.tpe_startup} trials, the recipe's included, have "
            f"finished); {prune}. A trial whose training "
            f"broke down (non-finite or diverging loss) is failed, counts against the budget and is never reported. "
            f"The completed trial with the best score is retrained for {epochs} epochs with {seeds}; {report}. "
            f"(Protocol of Musgrave et al., A Metric Learning Reality Check, ECCV 2020.)")


def run(args: argparse.Namespace) -> int:
    from unidml.extras import require

    started = time.perf_counter()
    require("optuna", "unidml compare")  # the study database and the tuner
    from unidml.config import check_trackers
    from unidml.engine.distributed import init_distributed, shutdown
    from unidml.launcher.logs import setup_logging
    from unidml.launcher.summary import study_summary
    from unidml.run_config import load_run_config
    from unidml.study.baselines import RAW_PIXELS, UNTRAINED, as_runs, epoch0_entries, raw_pixel_metrics
    from unidml.study.compare import describe, parse_losses, plan_losses
    from unidml.study.report import report_rows, write_report
    from unidml.study.results import collect, retraining_rates
    from unidml.study.tracking import StudyGroup
    from unidml.study.tuning import LossStudies, StudySettings, StudyWorker, default_storage

    _check_counts(args)
    losses = parse_losses(args.losses)
    out = Path(args.out or Path("runs") / f"compare_{Path(args.config).stem}")
    overrides, select = _study_overrides(args)
    base = load_run_config(args.config, overrides)
    check_trackers(base)
    env = init_distributed(base.engine.device)
    setup_logging(env.rank)
    settings = StudySettings(out=out, trials=args.trials, seeds=args.seeds, trial_epochs=args.trial_epochs,
                             objective=args.objective, seed=args.sampler_seed, prune=args.prune, name=args.study_name,
                             poll_seconds=args.poll_seconds)
    try:
        plans = plan_losses(args.config, losses, overrides, args.variants, cross_rank=env.distributed,
                            tuned=args.trials > 0)
        studies = group = None
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            studies = LossStudies(settings, plans, args.storage or default_storage(out), args.stale_after,
                                  create=not args.report_only)
            group = None if args.report_only else StudyGroup(base, out, args.study_name)
        if not args.report_only:
            StudyWorker(settings, plans, env, studies, group).run()
    finally:
        shutdown(env)
    if not env.is_main:
        return 0
    recipes = {p.loss: _loss_summary(p.config(0)) for p in plans}
    results = collect(settings, plans, studies, select, recipes)
    header = {"config": args.config, **describe(plans[0].config(0)),
              "seeds": ", ".join(str(s) for s in range(args.seeds)), "overrides": " ".join(overrides)}
    histories = [s.history for r in results for s in r.finished_seeds]
    pixels = raw_pixel_metrics([plans[0].config(seed) for seed in range(args.seeds)], env)
    baselines = {UNTRAINED: as_runs(epoch0_entries(histories)), RAW_PIXELS: as_runs(pixels)}
    paths = write_report(out, results, header, protocol_text(settings, select, base.train.epochs), args.objective,
                         baselines)
    if group is not None:
        group.close([path for path in sorted(out.glob("*")) if path.suffix in (".md", ".csv", ".png")])
    empty = [r.loss for r in results if not r.finished_seeds]
    print(study_summary([row for part in report_rows(results, baselines) for row in part], "test",
                        time.perf_counter() - started, retraining_rates(results)))
    print(f"report: {paths['markdown']} | {paths['csv']}" + (f" | no result for {', '.join(empty)}" if empty else ""))
    return 1 if empty else 0


def _loss_summary(cfg) -> str:
    """`param=value, ...` of a run's loss section, its sampler, embedding head and optimizer recipe, for the
    report header."""
    from omegaconf import OmegaConf

    params = {k: v for k, v in OmegaConf.to_container(cfg.loss, resolve=True).items() if k != "name"}
    sampler = cfg.data.sampler + (f" m={cfg.data.m_per_class}" if cfg.data.sampler == "m_per_class" else "")
    head = "BatchNorm1d" if cfg.model.feature_bn else "raw features"
    t = cfg.train
    momentum = f" momentum {t.momentum:g}{' Nesterov' if t.nesterov else ''}" if t.optimizer == "sgd" else ""
    optimizer = f"{t.optimizer} lr {t.lr:g}{momentum} wd {t.weight_decay:g} warm-up {t.warmup_iters} it"
    return ", ".join(f"{k}={v}" for k, v in params.items()) + f" ({sampler} sampler, {head} head, {optimizer})"
