"""The study's report: Markdown and CSV tables (mean ± std over seeds) and PNG plots, from the
`metrics.json` of every run directory `OUT/<loss>/seed<k>/`.

Each run contributes its `best` entry: the epoch its config's `eval.split` selected, with every
evaluated split's metrics at that epoch. The std is the sample standard deviation over seeds
(ddof = 1; 0 with one seed).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

MI_KEYS = ("mi_knn", "mi_classifier")
TERMS = ("tightness", "contrast")


def load_metrics(run_dirs: dict[str, list[Path]]) -> dict[str, list[dict]]:
    """loss -> the metrics.json of each of its runs that has one with a best entry (others are skipped)."""
    out: dict[str, list[dict]] = {}
    for loss, dirs in run_dirs.items():
        found = []
        for run_dir in dirs:
            path = run_dir / "metrics.json"
            if path.is_file():
                data = json.loads(path.read_text())
                if data.get("best"):
                    found.append(data)
        out[loss] = found
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value; NaN for none)."""
    clean = [float(v) for v in values]
    if not clean:
        return math.nan, math.nan
    mean = sum(clean) / len(clean)
    if len(clean) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in clean) / (len(clean) - 1))


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


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Wide CSV: loss, seeds, then `<column> mean` and `<column> std` for every summary column."""
    keys = [k for k in rows[0] if k not in ("loss", "seeds")] if rows else []
    keys += sorted({k for r in rows for k in r} - set(keys) - {"loss", "seeds"})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["loss", "seeds"] + [f"{k} {part}" for k in keys for part in ("mean", "std")])
        for row in rows:
            cells: list[Any] = [row["loss"], row["seeds"]]
            for key in keys:
                mean, std = row.get(key, (math.nan, math.nan))
                cells += ["" if math.isnan(mean) else f"{mean:.4f}", "" if math.isnan(std) else f"{std:.4f}"]
            writer.writerow(cells)


def markdown(rows: list[dict[str, Any]], metrics: dict[str, list[dict]], header: dict[str, Any],
             failures: Sequence[str], plots: Sequence[str]) -> str:
    """The report page: what was held fixed, one table per evaluated split, MI diagnostics, plots."""
    columns, splits = metric_columns(metrics), splits_of(metrics)
    lines = [f"# Loss comparison: {header['config']}", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items() if k not in ("config", "losses")]
    lines += ["- **losses**: " + "; ".join(f"`{name}` {params}" for name, params in header["losses"].items()),
              "- values: mean ± sample std over seeds, in percent, at the epoch each run selected", ""]
    for split in splits:
        lines += [f"## {split}", "", "| loss | seeds | epoch | " + " | ".join(map(_label, columns)) + " |",
                  "|---" * (len(columns) + 3) + "|"]
        for row in rows:
            cells = [_cell(row[f"{split} {k}"]) for k in columns]
            lines.append(f"| {row['loss']} | {row['seeds']} | {_cell(row['epoch'], 1)} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(k in row for row in rows for k in MI_KEYS):
        lines += ["## Mutual-information diagnostics at the selected epoch (nats, training-class sample)", "",
                  "| loss | I(Z;Y) soft-NN lower estimate | I(Z;Y) classifier lower estimate |", "|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['loss']} | " + " | ".join(_cell(row.get(k, (math.nan, 0.0)), 3) for k in MI_KEYS) + " |")
        lines.append("")
    if failures:
        lines += ["## Runs without results", ""] + [f"- {f}" for f in failures] + [""]
    lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


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
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_recall_curves(rows: list[dict[str, Any]], metrics: dict[str, list[dict]], split: str, path: Path) -> Path:
    """Recall@K against K at the selected epoch, mean ± std over seeds, one line per loss."""
    recalls = [k for k in metric_columns(metrics) if k.startswith("recall@")]
    ks = [int(k.split("@")[1]) for k in recalls]
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig, axes = plt.subplots(1, 1 + len(splits), figsize=(5 * (1 + len(splits)), 4))
    for loss, runs in metrics.items():
        axes[0].plot(*_epoch_means(runs, lambda e: e.get("train_loss")), marker=".", label=loss)
        for ax, split in zip(axes[1:], splits):
            ax.plot(*_epoch_means(runs, lambda e, s=split: e["splits"].get(s, {}).get("recall@1")), marker=".", label=loss)
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
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
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
    fig, ax = plt.subplots(figsize=(6, 4))
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


def write_report(out: Path, run_dirs: dict[str, list[Path]], header: dict[str, Any],
                 failures: Sequence[str] = ()) -> dict[str, Path]:
    """Write `summary.md`, `summary.csv` and the plots into `out`; return their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = load_metrics(run_dirs)
    missing = [f"{loss}: no finished run" for loss, runs in metrics.items() if not runs]
    metrics = {loss: runs for loss, runs in metrics.items() if runs}
    paths: dict[str, Path] = {}
    rows = summary_rows(metrics)
    if rows:
        splits = splits_of(metrics)
        paths["recall_at_k"] = plot_recall_curves(rows, metrics, splits[0], out / "recall_at_k.png")
        paths["training_curves"] = plot_training_curves(metrics, splits, out / "training_curves.png")
        paths["terms"] = plot_terms(metrics, out / "tightness_contrast.png")
        paths["information"] = plot_information(metrics, out / "mutual_information.png")
    plots = [str(p) for p in paths.values()]
    paths["csv"] = out / "summary.csv"
    write_csv(rows, paths["csv"])
    paths["markdown"] = out / "summary.md"
    paths["markdown"].write_text(markdown(rows, metrics, header, [*failures, *missing], plots))
    return paths
