"""The table printed at the end of `unidml train` and `unidml compare`: what was selected, on which split,
the metrics at that epoch, the command's wall time and the training throughput."""
from __future__ import annotations

import math
from typing import Any, Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric)).rstrip()
    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def run_summary(metrics: dict[str, Any], wall_s: float) -> str:
    """One row per evaluated split at the selected epoch (the selecting split first), then the run's totals."""
    best = metrics.get("best")
    if not best:
        return "no evaluated epoch"
    selecting = best["selected_by"].split()[0]
    order = [selecting] + [name for name in best["splits"] if name != selecting]
    rows = [[name, "selects the epoch" if name == selecting else "reported at that epoch",
             float(best["splits"][name].get("recall@1", math.nan)), float(best["splits"][name].get("map@r", math.nan)),
             int(best["splits"][name].get("num_queries", 0))] for name in order]
    throughput = metrics.get("throughput") or {}
    totals = (f"best epoch {best['epoch']} | wall time {wall_s:.0f} s | "
              f"{throughput.get('images_per_s', math.nan):.1f} images/s (training, last epoch)")
    return format_table(["split", "role", "R@1", "MAP@R", "queries"], rows) + "\n" + totals


def study_summary(rows: Sequence[dict[str, Any]], split: str, wall_s: float,
                  images_per_s: dict[str, float] | None = None) -> str:
    """One row per loss (and reference row) of the study report: seeds, selected epoch, `split` R@1 and
    MAP@R (mean ± std over seeds), the mean training images/s of its retrainings where known
    (`images_per_s`: loss -> rate), then the command's wall time."""
    def mean_std(value: Any) -> str:
        if not isinstance(value, tuple) or math.isnan(value[0]):
            return ""
        return f"{value[0]:.2f} ± {value[1]:.2f}"
    rates = images_per_s or {}
    table = [[row["loss"], int(row["seeds"]), mean_std(row.get("epoch")), mean_std(row.get(f"{split} recall@1")),
              mean_std(row.get(f"{split} map@r")), f"{rates[row['loss']]:.1f}" if row["loss"] in rates else ""]
             for row in rows]
    return (format_table(["loss", "seeds", "epoch", f"{split} R@1", f"{split} MAP@R", "images/s"], table)
            + f"\nwall time {wall_s:.0f} s")
