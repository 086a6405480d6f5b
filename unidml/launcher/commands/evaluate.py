"""`unidml eval`: retrieval metrics of a checkpoint (or of saved embeddings), printed and saved as JSON.

    unidml eval --checkpoint RUN/checkpoints/best.pt [--config FILE] [--split test] [--out FILE] [key=value ...]
    unidml eval --embeddings EMB.npz [--ks 1 10 100] [--metric cosine] [--out FILE] [key=value ...]
    unidml eval --embeddings EMB.npy [--gallery-embeddings GALLERY.npy] [--ks 1 10 100]   # from `unidml embed`
    unidml eval ... --rerank k_reciprocal [eval.rerank.k1=20 ...]                      # re-ranked lists

With a checkpoint, the model and (unless --config gives another) the run's config come from the
file; overrides apply on top. Runs in one process or under torchrun (every rank evaluates its shard).
An embeddings file is an .npz with `query`, `query_labels` and optionally `gallery`, `gallery_labels`.
Saved embeddings take their eval settings (eval.ks, eval.metric, eval.metrics, eval.rerank) from the
run whose checkpoint the `unidml embed` .json beside them names, else from the defaults; overrides and
flags apply on top. The record's `rerank` names the re-ranking behind the metrics and its parameters.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from unidml.config import METRICS, RERANKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a unidml checkpoint (e.g. RUN/checkpoints/best.pt)")
    source.add_argument("--embeddings", help="saved embeddings: an `unidml embed` .npy (with its .tsv), or an .npz "
                                             "of query, query_labels[, gallery, gallery_labels]")
    parser.add_argument("--gallery-embeddings", default=None, metavar="NPY",
                        help="with an `unidml embed` .npy: search this one instead of the queries themselves")
    parser.add_argument("--config", default=None,
                        help="take data/eval/engine settings from this YAML instead of the checkpoint's config")
    parser.add_argument("--split", default="test",
                        help="evaluation pair to run: test (default) or val (the split that selected the best epoch)")
    parser.add_argument("--ks", type=int, nargs="+", default=None,
                        help="Recall@K values (default: eval.ks of the run, also for --embeddings)")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="similarity (default: eval.metric of the run, also for --embeddings)")
    parser.add_argument("--rerank", choices=RERANKS, default=None,
                        help="re-rank the neighbour lists (default: eval.rerank.name, none); parameters as "
                             "overrides, e.g. eval.rerank.k1=20 (docs/design.md, \"Re-ranking\")")
    parser.add_argument("--out", default=None,
                        help="metrics JSON (default: eval_<input name>.json next to the input, e.g. eval_best.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. eval.ks=[1,10]")


def _overrides(args: argparse.Namespace) -> list[str]:
    """The key=value overrides with the flags that set eval keys appended."""
    overrides = list(args.overrides)
    overrides += [f"eval.ks=[{','.join(str(k) for k in args.ks)}]"] if args.ks else []
    overrides += [f"eval.metric={args.metric}"] if args.metric else []
    overrides += [f"eval.rerank.name={args.rerank}"] if args.rerank else []
    return overrides


def _checkpoint_config(args: argparse.Namespace):
    """The model from the checkpoint; the settings from --config when given, else the checkpoint's."""
    from unidml.run_config import load_for_inference, load_run_config

    overrides = _overrides(args)
    model, cfg = load_for_inference(args.checkpoint, overrides)
    if args.config:
        cfg = load_run_config(args.config, overrides)
    return model, cfg


def evaluate_checkpoint(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """(JSON record, whether this process is the main rank)."""
    from unidml.data_pipeline import build_dataset
    from unidml.engine.distributed import init_distributed, shutdown
    from unidml.engine.evaluator import Evaluator
    from unidml.evaluation.rerank import describe, rerank_settings

    model, cfg = _checkpoint_config(args)
    env = init_distributed(str(cfg.engine.device))
    try:
        dataset = build_dataset(cfg.data, seed=int(cfg.train.seed))
        split = args.split
        evaluator = Evaluator(cfg, dataset, env, split=split, option="--split")
        metrics = evaluator.evaluate(model.to(env.device))[split]
        unreadable = evaluator.unreadable()
    finally:
        shutdown(env)
    query_split, gallery_split = evaluator.pairs[split]
    record = {"checkpoint": str(args.checkpoint), "dataset": dataset.name, "split": split,
              "query": query_split, "gallery": gallery_split or query_split, "metric": str(cfg.eval.metric),
              "rerank": describe(rerank_settings(cfg.eval.rerank)), "world_size": env.world_size, "metrics": metrics,
              "unreadable": unreadable}
    return record, env.is_main


def embed_file_arrays(path: Path, gallery: str | None) -> dict[str, Any]:
    """Query (and gallery) arrays of files written by `unidml embed`."""
    from unidml.evaluation.embedding_files import read_embeddings

    vectors, labels, _, _ = read_embeddings(path)
    arrays = {"query": vectors, "query_labels": labels}
    if gallery:
        arrays["gallery"], arrays["gallery_labels"], _, _ = read_embeddings(gallery)
    return arrays


def embeddings_config(path: Path, args: argparse.Namespace) -> Any:
    """The eval settings of saved embeddings: --config when given, else the config of the run whose
    checkpoint the `unidml embed` .json beside them names (when that checkpoint is readable here), else
    the defaults; overrides and flags on top."""
    from unidml.engine.checkpoint import load
    from unidml.evaluation.embedding_files import sidecars
    from unidml.run_config import load_run_config, stored_run_config

    if args.config:
        return load_run_config(args.config, _overrides(args))
    info = sidecars(path)[2] if path.suffix == ".npy" else None
    named = json.loads(info.read_text()).get("checkpoint") if info is not None and info.is_file() else None
    if named and Path(named).is_file():
        return stored_run_config(load(named), named, _overrides(args))
    if named:
        print(f"note: {named} (named in {info}) is not readable here: using the default eval settings")
    return load_run_config(None, _overrides(args))


def evaluate_embeddings(args: argparse.Namespace) -> dict[str, Any]:
    """Metrics of the arrays saved in an .npz file (one process)."""
    import numpy as np

    from unidml.errors import UserError
    from unidml.evaluation import retrieval_metrics
    from unidml.evaluation.rerank import describe, rerank_settings

    path = Path(args.embeddings)
    if args.gallery_embeddings and path.suffix != ".npy":
        raise UserError("--gallery-embeddings: only with an `unidml embed` .npy as --embeddings")
    if path.suffix == ".npy":
        arrays = embed_file_arrays(path, args.gallery_embeddings)
    elif not path.is_file():
        raise UserError(f"{path}: embeddings file not found")
    else:
        try:
            arrays = dict(np.load(path))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [key for key in ("query", "query_labels") if key not in arrays]
    if missing or (("gallery" in arrays) != ("gallery_labels" in arrays)):
        raise UserError(f"{path}: needs arrays query, query_labels and optionally gallery with gallery_labels "
                        f"(found: {', '.join(sorted(arrays)) or 'none'})")
    cfg = embeddings_config(path, args)
    metric, rerank = str(cfg.eval.metric), rerank_settings(cfg.eval.rerank)
    try:
        metrics = retrieval_metrics(arrays["query"], arrays["query_labels"], arrays.get("gallery"),
                                    arrays.get("gallery_labels"), ks=list(cfg.eval.ks), metrics=list(cfg.eval.metrics),
                                    metric=metric, memory_budget_mb=float(cfg.eval.memory_budget_mb), rerank=rerank)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    return {"embeddings": str(path), "metric": metric, "rerank": describe(rerank), "metrics": metrics}


def format_metrics(metrics: dict[str, Any], rerank: dict[str, Any] | None = None) -> str:
    """One line: the re-ranking (when there is one), the metric values (percent) and the query counts."""
    from unidml.engine.run_record import COUNT_KEYS, query_counts

    values = [f"{k}={v:.2f}" for k, v in metrics.items() if k not in COUNT_KEYS]
    prefix = ""
    if rerank and rerank["name"] != "none":
        prefix = f"rerank {rerank['name']} ({', '.join(f'{k}={v}' for k, v in rerank.items() if k != 'name')}): "
    return prefix + ", ".join(values) + " " + query_counts(metrics)


def output_path(args: argparse.Namespace) -> Path:
    """--out, or `eval_<input stem>.json` beside the input (evaluating best.pt then last.pt keeps both);
    checked before any work, so a bad --out fails in one line at once."""
    from unidml.errors import UserError

    source = Path(args.checkpoint or args.embeddings)
    out = Path(args.out) if args.out else source.parent / f"eval_{source.stem}.json"
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; name a .json file")
    return out


def run(args: argparse.Namespace) -> int:
    from unidml.engine.run_record import write_text_atomic

    out = output_path(args)
    if args.checkpoint:
        record, is_main = evaluate_checkpoint(args)
    else:
        record, is_main = evaluate_embeddings(args), True
    if is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(record, indent=2) + "\n", out)
        print(format_metrics(record["metrics"], record["rerank"]))
        print(f"metrics written to {out}")
    return 0
