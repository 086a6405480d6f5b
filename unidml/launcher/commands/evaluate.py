"""`unidml eval`: retrieval metrics of a checkpoint (or of saved embeddings), printed and saved as JSON.

    unidml eval --checkpoint RUN/checkpoints/best.pt [--config FILE] [--split test] [--out FILE] [key=value ...]
    unidml eval --embeddings EMB.npz [--ks 1 10 100] [--metric cosine] [--out FILE]

With a checkpoint, the model and (unless --config gives another) the run's config come from the
file; overrides apply on top. Runs in one process or under torchrun (every rank evaluates its shard).
An embeddings file is an .npz with `query`, `query_labels` and optionally `gallery`, `gallery_labels`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a unidml checkpoint (e.g. RUN/checkpoints/best.pt)")
    source.add_argument("--embeddings", help=".npz of saved embeddings: query, query_labels[, gallery, gallery_labels]")
    parser.add_argument("--config", default=None,
                        help="take data/eval/engine settings from this YAML instead of the checkpoint's config")
    parser.add_argument("--split", default=None, help="evaluation pair to run (default: eval.split)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="Recall@K values (default: eval.ks, or 1 10 100 for --embeddings)")
    parser.add_argument("--metric", choices=("cosine", "euclidean"), default=None, help="similarity (default: eval.metric, or cosine for --embeddings)")
    parser.add_argument("--out", default=None, help="metrics JSON (default: eval_metrics.json next to the input)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. eval.ks=[1,10]")


def _checkpoint_config(args: argparse.Namespace):
    """The model from the checkpoint; the settings from --config when given, else the checkpoint's."""
    from unidml.config import load_config
    from unidml.engine.checkpoint import load_for_inference

    overrides = list(args.overrides)
    overrides += [f"eval.ks=[{','.join(str(k) for k in args.ks)}]"] if args.ks else []
    overrides += [f"eval.metric={args.metric}"] if args.metric else []
    model, cfg = load_for_inference(args.checkpoint, overrides)
    if args.config:
        cfg = load_config(args.config, overrides)
    return model, cfg


def evaluate_checkpoint(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """(JSON record, whether this process is the main rank)."""
    from unidml.data_pipeline import build_dataset, build_eval_loader
    from unidml.engine.distributed import init_distributed, shutdown
    from unidml.errors import UserError
    from unidml.evaluation import evaluate_model

    model, cfg = _checkpoint_config(args)
    env = init_distributed(str(cfg.engine.device))
    try:
        dataset = build_dataset(cfg.data, seed=int(cfg.train.seed))
        split = args.split or str(cfg.eval.split)
        if split not in dataset.eval_pairs:
            raise UserError(f"--split '{split}': not evaluated for dataset '{dataset.name}' "
                            f"(available: {', '.join(dataset.eval_pairs)}; 'val' needs data.val_classes > 0)")
        query_split, gallery_split = dataset.eval_pairs[split]

        def loader(name: str):
            return build_eval_loader(cfg.data, dataset.splits[name], batch_size=int(cfg.eval.batch_size),
                                     rank=env.rank, world_size=env.world_size, device=env.device)

        try:
            metrics = evaluate_model(model.to(env.device), loader(query_split),
                                     loader(gallery_split) if gallery_split else None, ks=list(cfg.eval.ks),
                                     metrics=list(cfg.eval.metrics), metric=str(cfg.eval.metric),
                                     memory_budget_mb=float(cfg.eval.memory_budget_mb), device=env.device,
                                     precision=str(cfg.engine.precision))
        except ValueError as exc:  # an eval.* setting the evaluation cannot use
            raise UserError(f"{args.checkpoint}: {exc}") from None
    finally:
        shutdown(env)
    record = {"checkpoint": str(args.checkpoint), "dataset": dataset.name, "split": split,
              "query": query_split, "gallery": gallery_split or query_split, "metric": str(cfg.eval.metric),
              "world_size": env.world_size, "metrics": metrics}
    return record, env.is_main


def evaluate_embeddings(args: argparse.Namespace) -> dict[str, Any]:
    """Metrics of the arrays saved in an .npz file (one process)."""
    import numpy as np

    from unidml.errors import UserError
    from unidml.evaluation import retrieval_metrics

    path = Path(args.embeddings)
    if not path.is_file():
        raise UserError(f"{path}: embeddings file not found")
    try:
        arrays = dict(np.load(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [key for key in ("query", "query_labels") if key not in arrays]
    if missing or (("gallery" in arrays) != ("gallery_labels" in arrays)):
        raise UserError(f"{path}: needs arrays query, query_labels and optionally gallery with gallery_labels "
                        f"(found: {', '.join(sorted(arrays)) or 'none'})")
    metric = args.metric or "cosine"
    ks = args.ks or [1, 10, 100]
    try:
        metrics = retrieval_metrics(arrays["query"], arrays["query_labels"], arrays.get("gallery"),
                                    arrays.get("gallery_labels"), ks=ks, metric=metric)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    return {"embeddings": str(path), "metric": metric, "metrics": metrics}


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line: the metric values (percent) and the query counts."""
    values = [f"{k}={v:.2f}" for k, v in metrics.items() if k not in ("num_queries", "excluded_queries")]
    return (", ".join(values) + f" ({metrics['num_queries']} queries, "
            f"{metrics['excluded_queries']} excluded: no relevant reference)")


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        record, is_main = evaluate_checkpoint(args)
        default_out = Path(args.checkpoint).parent / "eval_metrics.json"
    else:
        record, is_main = evaluate_embeddings(args), True
        default_out = Path(args.embeddings).parent / "eval_metrics.json"
    if is_main:
        out = Path(args.out) if args.out else default_out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(format_metrics(record["metrics"]))
        print(f"metrics written to {out}")
    return 0
