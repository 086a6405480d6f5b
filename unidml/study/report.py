"""The study's report: Markdown and CSV tables and PNG plots, written into the study directory.

Per loss: the test (and val) metrics of its retrainings, mean ± sample std over seeds (ddof = 1; 0
with one seed), each taken at the trained epoch the retraining selected on the validation split;
the hyperparameters chosen by tuning; every trial's validation score; the budget it used (trials,
epochs, images seen); and every failed trial or retraining with its reason. Two reference rows
(`unidml.study.baselines`: the untrained network and raw pixels) sit under every table, a loss
below either is flagged, and seeds give a 95 % t interval of Recall@1 and a Welch test per pair of
losses (`unidml.study.stats`). Files are replaced
atomically, so workers that finish at the same time may each write the report.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend is chosen or needed
from matplotlib.ticker import MaxNLocator

from unidml.study.results import LossResult, Usage
from unidml.study.stats import LEVEL, confidence_interval, indistinguishable

MI_KEYS = ("mi_knn", "mi_classifier")
TERMS = ("tightness", "contrast")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value; NaN for none)."""
    clean = [float(v) for v in values]
    if not clean:
        return math.nan, math.nan
    mean = sum(clean) / len(clean)
    if len(clean) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in clean) / (len(clean) - 1))


def _runs(results: Sequence[LossResult]) -> dict[str, list[dict]]:
    """loss -> [{"best": selected entry, "epochs": history}] of its finished retrainings."""
    return {r.loss: [{"best": s.selected, "epochs": s.history} for s in r.finished_seeds]
            for r in results if r.finished_seeds}


def metric_columns(metrics: dict[str, list[dict]]) -> list[str]:
    """Recall@K by increasing K, then MAP@R and R-Precision: what the runs report."""
    keys = {k for runs in metrics.values() for data in runs for split in data["best"]["splits"].values() for k in split}
    recalls = sorted((k for k in keys if k.startswith("recall@")), key=lambda k: int(k.split("@")[1]))
    return recalls + [k for k in ("map@r", "r_precision") if k in keys]


def splits_of(metrics: dict[str, list[dict]]) -> list[str]:
    names = {name for runs in metrics.values() for data in runs for name in data["best"]["splits"]}
    return sorted(names, key=lambda s: (s != "test", s))


def summary_rows(metrics: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per loss: seeds, selected epoch, and (mean, std) of every split's metric and MI diagnostic."""
    columns, splits = metric_columns(metrics), splits_of(metrics)
    rows = []
    for loss, runs in metrics.items():
        bests = [data["best"] for data in runs]
        row: dict[str, Any] = {"loss": loss, "seeds": len(bests), "epoch": mean_std([b["epoch"] for b in bests])}
        for split in splits:
            for key in columns:
                row[f"{split} {key}"] = mean_std([b["splits"][split][key] for b in bests if split in b["splits"]])
        for key in MI_KEYS:
            values = [b[key] for b in bests if key in b]
            if values:
                row[key] = mean_std(values)
        rows.append(row)
    return rows


def _cell(value: tuple[float, float], digits: int = 2) -> str:
    mean, std = value
    return "" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _label(key: str) -> str:
    return {"map@r": "MAP@R", "r_precision": "R-Prec"}.get(key, key.replace("recall@", "R@"))


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def summary_csv(rows: list[dict[str, Any]]) -> str:
    """Wide CSV: loss, seeds, then `<column> mean` and `<column> std` for every summary column."""
    keys = [k for k in rows[0] if k not in ("loss", "seeds")] if rows else []
    keys += sorted({k for r in rows for k in r} - set(keys) - {"loss", "seeds"})
    table = []
    for row in rows:
        cells: list[Any] = [row["loss"], row["seeds"]]
        for key in keys:
            mean, std = row.get(key, (math.nan, math.nan))
            cells += ["" if math.isnan(mean) else f"{mean:.4f}", "" if math.isnan(std) else f"{std:.4f}"]
        table.append(cells)
    return _csv_text(["loss", "seeds"] + [f"{k} {part}" for k in keys for part in ("mean", "std")], table)


def trials_csv(results: Sequence[LossResult], objective: str) -> str:
    """One row per trial: loss, trial, state, val objective, epochs, images, failure, then every searched key."""
    keys = sorted({k for r in results for t in r.trials for k in t.params})
    table = [[r.loss, t.slot, t.state, "" if t.value is None else f"{t.value:.4f}", t.usage.epochs, t.usage.images,
              t.reason, *[t.params.get(k, "") for k in keys]] for r in results for t in r.trials]
    return _csv_text(["loss", "trial", "state", f"val {objective}", "epochs", "images", "failure", *keys], table)


def hyperparameters_csv(results: Sequence[LossResult], objective: str) -> str:
    """One row per (loss, searched key) of the chosen setting."""
    table = [[r.loss, r.chosen.slot, f"{r.chosen.value:.4f}", key, value]
             for r in results if r.chosen is not None for key, value in r.chosen.params.items()]
    return _csv_text(["loss", "trial", f"val {objective}", "key", "value"], table)


def budget(result: LossResult) -> dict[str, Any]:
    """Trials by state and the training each phase used (epochs, images seen)."""
    states = [t.state for t in result.trials]
    tuning = sum((t.usage for t in result.trials), Usage())
    retraining = sum((s.usage for s in result.seeds), Usage())
    return {"trials": len(states), "complete": states.count("complete"), "pruned": states.count("pruned"),
            "failed": states.count("failed"), "tuning": tuning, "retraining": retraining,
            "failed_seeds": sum(s.status == "failed" for s in result.seeds)}


def _interval(low_high: tuple[float, float]) -> str:
    low, high = low_high
    return "" if math.isnan(low) else f"[{low:.2f}, {high:.2f}]"


def recall_scores(metrics: dict[str, list[dict]], split: str) -> dict[str, list[float]]:
    """loss -> the Recall@1 of each of its runs on `split` (at the selected epoch)."""
    return {loss: [d["best"]["splits"][split]["recall@1"] for d in runs if split in d["best"]["splits"]]
            for loss, runs in metrics.items()}


def flags(rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]], split: str) -> dict[str, list[str]]:
    """loss -> the reference rows whose mean Recall@1 on `split` is above the loss's mean."""
    key = f"{split} recall@1"
    refs = {r["loss"]: r[key][0] for r in baseline_rows if key in r and not math.isnan(r[key][0])}
    return {row["loss"]: [name for name, score in refs.items() if row[key][0] < score]
            for row in rows if key in row}


def _split_table(split: str, rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]],
                 metrics: dict[str, list[dict]], columns: list[str]) -> list[str]:
    intervals = {loss: confidence_interval(values) for loss, values in recall_scores(metrics, split).items()}
    below = flags(rows, baseline_rows, split)
    lines = [f"## {split}", "", "mean ± sample std over seeds, in percent, at the trained epoch each retraining "
             f"selected; R@1 CI: {LEVEL:.0%} Student-t interval of the mean (two seeds or more); the last two rows "
             "are the references on the same split", "",
             "| loss | seeds | epoch | " + " | ".join(map(_label, columns)) + " | R@1 CI | below a reference |",
             "|---" * (len(columns) + 5) + "|"]
    for row in rows:
        cells = [_cell(row[f"{split} {k}"]) for k in columns]
        flag = "**" + ", ".join(below.get(row["loss"], [])) + "**" if below.get(row["loss"]) else ""
        lines.append(f"| {row['loss']} | {row['seeds']} | {_cell(row['epoch'], 1)} | " + " | ".join(cells)
                     + f" | {_interval(intervals.get(row['loss'], (math.nan, math.nan)))} | {flag} |")
    for row in baseline_rows:
        cells = [_cell(row.get(f"{split} {k}", (math.nan, math.nan))) for k in columns]
        lines.append(f"| *{row['loss']}* | {row['seeds']} | | " + " | ".join(cells) + " | | |")
    lines.append("")
    flagged = [f"`{loss}` (below {', '.join(names)})" for loss, names in below.items() if names]
    if flagged:
        lines += [f"**Below a reference on {split}**: " + "; ".join(flagged) + ".", ""]
    scores = recall_scores(metrics, split)
    if min((len(v) for v in scores.values()), default=0) < 2:
        lines += [f"One seed for some loss: no interval, and no difference between losses on {split} is tested.", ""]
    else:
        same = indistinguishable(scores)
        lines += [f"Not distinguishable on {split} R@1 (Welch's t-test, p >= {1 - LEVEL:.2f}): "
                  + ("; ".join(f"`{a}` and `{b}` (p = {p:.2f})" for a, b, p in same) if same else "no pair") + ".", ""]
    return lines


def markdown(results: Sequence[LossResult], rows: list[dict[str, Any]], metrics: dict[str, list[dict]],
             header: dict[str, Any], protocol: str, objective: str, plots: Sequence[Path],
             baseline_rows: Sequence[dict[str, Any]] = ()) -> str:
    """The report page: protocol, result tables with the reference rows, chosen settings, budget, trials,
    failures, plots."""
    columns, splits = metric_columns(metrics), splits_of(metrics)
    lines = [f"# Loss comparison: {header['config']}", "", "## Protocol", "", protocol, ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items() if k != "config"]
    lines += ["- **losses** (recipe variants): " + "; ".join(f"`{r.loss}` {r.recipe}" for r in results), ""]
    for split in splits:
        lines += _split_table(split, rows, list(baseline_rows), metrics, columns)
    lines += _tuning_sections(results, objective)
    if any(k in row for row in rows for k in MI_KEYS):
        lines += ["## Mutual-information diagnostics at the selected epoch (nats, training-class sample)", "",
                  "| loss | I(Z;Y) soft-NN lower estimate | I(Z;Y) classifier lower estimate |", "|---|---|---|"]
        for row in rows:
            cells = [_cell(row.get(k, (math.nan, 0.0)), 3) for k in MI_KEYS]
            lines.append(f"| {row['loss']} | " + " | ".join(cells) + " |")
        lines.append("")
    failures = [f"{r.loss} trial {t.slot}: {t.reason}" for r in results for t in r.trials if t.state == "failed"]
    failures += [f"{r.loss} seed {s.seed}: {s.status}: {s.reason}"
                 for r in results for s in r.seeds if s.status != "complete"]
    failures += [f"{r.loss}: no completed trial, nothing retrained" for r in results if r.trials and r.chosen is None]
    if failures:
        lines += ["## Failed or missing runs (no result is reported for them)", ""]
        lines += [f"- {f}" for f in failures] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += _run_plot_links(results)
    return "\n".join(lines)


def _run_plot_links(results: Sequence[LossResult]) -> list[str]:
    """Links to each retraining's own plots (Recall@K of the selection and test splits, training loss)."""
    links = []
    for r in results:
        for s in r.seeds:
            if s.directory is None or not (s.directory / "plots").is_dir():
                continue
            base = f"{s.directory.parent.name}/{s.directory.name}/plots"
            files = [f"[{p.stem}]({base}/{p.name})" for p in sorted((s.directory / "plots").glob("*.png"))]
            links.append(f"- {r.loss} seed {s.seed}: " + ", ".join(files))
    return ["## Plots of each retraining", ""] + links + [""] if links else []


def _tuning_sections(results: Sequence[LossResult], objective: str) -> list[str]:
    lines = ["## Budget", "", "| loss | trials | complete | pruned | failed | tuning epochs | tuning images | "
             "retraining epochs | retraining images | failed retrainings |", "|---" * 10 + "|"]
    for r in results:
        b = budget(r)
        lines.append(f"| {r.loss} | {b['trials']} | {b['complete']} | {b['pruned']} | {b['failed']} | "
                     f"{b['tuning'].epochs} | {b['tuning'].images:,} | {b['retraining'].epochs} | "
                     f"{b['retraining'].images:,} | {b['failed_seeds']} |")
    lines.append("")
    tuned = [r for r in results if r.trials]
    if not tuned:
        return lines
    lines += ["## Chosen hyperparameters", "", f"| loss | trial | val {_label(objective)} | setting |",
              "|---|---|---|---|"]
    for r in tuned:
        if r.chosen is None:
            lines.append(f"| {r.loss} | none | | no completed trial |")
        else:
            setting = ", ".join(f"`{k}`={_value(v)}" for k, v in r.chosen.params.items())
            lines.append(f"| {r.loss} | {r.chosen.slot} | {r.chosen.value:.2f} | {setting} |")
    lines += ["", "## Trials (validation split)", ""]
    for r in tuned:
        lines += [f"### {r.loss}", "", "search space: " + "; ".join(f"`{d}`" for d in r.dims), "",
                  f"| trial | state | val {_label(objective)} | epochs | setting |", "|---|---|---|---|---|"]
        for t in r.trials:
            value = "" if t.value is None else f"{t.value:.2f}" + (" (at stop)" if t.state == "pruned" else "")
            setting = ", ".join(f"{k}={_value(v)}" for k, v in t.params.items())
            setting += f" ({t.reason})" if t.reason else ""
            lines.append(f"| {t.slot} | {t.state} | {value} | {t.usage.epochs} | {setting} |")
        lines.append("")
    return lines


def _epoch_means(runs: list[dict], value) -> tuple[list[int], list[float]]:
    """Per-epoch mean over seeds of `value(entry)` (entries where it is None are skipped)."""
    by_epoch: dict[int, list[float]] = {}
    for data in runs:
        for entry in data["epochs"]:
            v = value(entry)
            if v is not None:
                by_epoch.setdefault(entry["epoch"], []).append(float(v))
    epochs = sorted(by_epoch)
    return epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() in ("epoch", "trial"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def plot_recall_curves(rows: list[dict[str, Any]], metrics: dict[str, list[dict]], split: str, path: Path) -> Path:
    """Recall@K against K at the selected epoch, mean ± std over seeds, one line per loss."""
    recalls = [k for k in metric_columns(metrics) if k.startswith("recall@")]
    ks = [int(k.split("@")[1]) for k in recalls]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for row in rows:
        means = [row[f"{split} {k}"][0] for k in recalls]
        stds = [row[f"{split} {k}"][1] for k in recalls]
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=row["loss"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel(f"{split} Recall@K (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_training_curves(metrics: dict[str, list[dict]], splits: Sequence[str], path: Path) -> Path:
    """Training loss and Recall@1 of every evaluated split per epoch (means over seeds)."""
    fig = Figure(figsize=(5 * (1 + len(splits)), 4))
    axes = fig.subplots(1, 1 + len(splits))
    for loss, runs in metrics.items():
        axes[0].plot(*_epoch_means(runs, lambda e: e.get("train_loss")), marker=".", label=loss)
        for ax, split in zip(axes[1:], splits):
            curve = _epoch_means(runs, lambda e, s=split: e["splits"].get(s, {}).get("recall@1"))
            ax.plot(*curve, marker=".", label=loss)
    axes[0].set_ylabel("training loss (epoch mean, own scale per loss)")
    for ax, split in zip(axes[1:], splits):
        ax.set_ylabel(f"{split} Recall@1 (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_terms(metrics: dict[str, list[dict]], path: Path) -> Path:
    """Each loss's tightness and contrast terms over training (epoch means, averaged over seeds)."""
    losses = list(metrics)
    cols = min(3, max(1, len(losses)))
    rows = -(-len(losses) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, loss in zip(axes.flat, losses):
        for term in TERMS:
            ax.plot(*_epoch_means(metrics[loss], lambda e, t=term: e.get(t)), marker=".", label=term)
        ax.set_title(loss)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(losses):]:
        ax.axis("off")
    return _save(fig, path)


def plot_information(metrics: dict[str, list[dict]], path: Path) -> Path:
    """The MI lower estimates over training: soft-NN (solid, any loss) and classifier (dashed, CE)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for loss, runs in metrics.items():
        line = ax.plot(*_epoch_means(runs, lambda e: e.get("mi_knn")), marker=".", label=f"{loss} soft-NN")[0]
        epochs, values = _epoch_means(runs, lambda e: e.get("mi_classifier"))
        if epochs:
            ax.plot(epochs, values, linestyle="--", color=line.get_color(), label=f"{loss} classifier")
    ax.set_xlabel("epoch")
    ax.set_ylabel("I(Z;Y) lower estimate (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def best_so_far(values: Sequence[float | None]) -> list[float]:
    """Running maximum over trials of the completed trials' scores (NaN until the first one)."""
    out, best = [], math.nan
    for v in values:
        if v is not None and math.isfinite(v) and not v <= best:
            best = v
        out.append(best)
    return out


def plot_tuning(results: Sequence[LossResult], objective: str, path: Path) -> Path:
    """Best-so-far validation score against trial number per loss (line), every trial as a marker:
    dot completed, cross pruned (at its last reported score), x at the bottom failed."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    low = min([t.value for r in results for t in r.trials if t.value is not None] or [0.0])  # where failures sit
    for r in results:
        slots = [t.slot for t in r.trials]
        completed = [t.value if t.state == "complete" else None for t in r.trials]
        line = ax.plot(slots, best_so_far(completed), drawstyle="steps-post", label=r.loss)[0]
        color = line.get_color()
        done = [(t.slot, t.value) for t in r.trials if t.state == "complete" and t.value is not None]
        if done:
            ax.scatter(*zip(*done), color=color, s=18)
        failed = [t.slot for t in r.trials if t.state == "failed"]
        if failed:
            ax.scatter(failed, [low] * len(failed), color=color, marker="x", s=30)
        pruned = [(t.slot, t.value) for t in r.trials if t.state == "pruned" and t.value is not None]
        if pruned:
            ax.scatter(*zip(*pruned), color=color, marker="+", s=40)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best-so-far val {_label(objective)} (%)")
    ax.set_title("tuning: completed (dot), pruned (+) and failed (x) trials", fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def report_rows(results: Sequence[LossResult], baselines: dict[str, list[dict]] | None = None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one summary row per loss, one per reference baseline) as the report's tables show them."""
    return summary_rows(_runs(results)), summary_rows({name: runs for name, runs in (baselines or {}).items() if runs})


def write_report(out: Path, results: Sequence[LossResult], header: dict[str, Any], protocol: str,
                 objective: str = "recall@1", baselines: dict[str, list[dict]] | None = None) -> dict[str, Path]:
    """Write `summary.md`, `summary.csv`, `trials.csv`, `hyperparameters.csv` and the plots into `out`;
    `baselines` (reference name -> runs shaped like `_runs`'s) become rows of the tables and CSV."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = _runs(results)
    rows, baseline_rows = report_rows(results, baselines)
    paths: dict[str, Path] = {}
    if rows:
        splits = splits_of(metrics)
        paths["recall_at_k"] = plot_recall_curves(rows, metrics, splits[0], out / "recall_at_k.png")
        paths["training_curves"] = plot_training_curves(metrics, splits, out / "training_curves.png")
        paths["terms"] = plot_terms(metrics, out / "tightness_contrast.png")
        paths["information"] = plot_information(metrics, out / "mutual_information.png")
    if any(r.trials for r in results):
        paths["tuning"] = plot_tuning([r for r in results if r.trials], objective, out / "tuning_curves.png")
        paths["trials"] = _write_atomic(out / "trials.csv", trials_csv(results, objective))
        paths["hyperparameters"] = _write_atomic(out / "hyperparameters.csv", hyperparameters_csv(results, objective))
    plots = [p for p in paths.values() if p.suffix == ".png"]
    paths["csv"] = _write_atomic(out / "summary.csv", summary_csv(rows + baseline_rows))
    paths["markdown"] = _write_atomic(out / "summary.md", markdown(results, rows, metrics, header, protocol,
                                                                  objective, plots, baseline_rows))
    return paths
