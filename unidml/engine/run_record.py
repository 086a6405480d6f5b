"""What a run leaves behind (rank 0 only): metrics.json, TensorBoard scalars, PNG plots.

`metrics.json` holds one entry per evaluated epoch (`epoch`, `recall@K`..., `map@r`,
`r_precision`, the query counts `num_queries`, `excluded_queries`, `unreadable_images`, and every
evaluated split under `splits`), the `best` entry with the protocol that selected it, training
throughput, `embed_chunks` (K, whether the chunked gradient is exact, and the train-mode BatchNorm
layers that make it inexact) and `stopped` (null, or why the run stopped early: `{"reason": "non_finite", ...}`).
It is rewritten atomically once the evaluated epoch's checkpoint is written (`flush`, called by the
trainer after each save), so it never lists an epoch that no checkpoint holds; a full disk fails with
one line and leaves the previous file intact.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable

from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend is chosen or needed

from unidml.errors import UserError


def write_atomic(write: Callable[[Path], None], path: Path) -> None:
    """Replace `path` with what `write(temp_path)` produces, in one rename, so readers never see half
    a file; an OS error (a full disk) is one line and leaves the old file as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise UserError(f"{path}: cannot write ({reason}); the previous version is intact") from None


def write_text_atomic(text: str, path: Path) -> None:
    """`write_atomic` of a text file."""
    write_atomic(lambda tmp: tmp.write_text(text), path)


COUNT_KEYS = ("num_queries", "excluded_queries", "unreadable_images")


def query_counts(metrics: dict) -> str:
    """What a metrics line rests on: "(N queries, E excluded: no relevant reference, U unreadable
    images left out)", the last part only when some were."""
    text = f"{metrics['num_queries']} queries, {metrics['excluded_queries']} excluded: no relevant reference"
    if metrics.get("unreadable_images"):
        text += f", {metrics['unreadable_images']} unreadable images left out"
    return f"({text})"


class RunRecord:
    """Metric history, best-epoch selection and the files that show them."""

    def __init__(self, run_dir: Path, enabled: bool, selection_split: str, history: list[dict] | None = None) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.selection_split = selection_split
        self.history: list[dict] = list(history or [])
        self.throughput: dict[str, float] = {}
        self.embed_chunks: dict | None = None
        self.stopped: dict | None = None
        self._writer = None

    @property
    def writer(self):
        """TensorBoard writer, created on first use (rank 0 only)."""
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        return self._writer

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def best(self) -> dict | None:
        """The evaluated epoch with the highest Recall@1 on the selection split (earliest on ties)."""
        key = "recall@1"
        scored = [entry for entry in self.history if key in entry]
        if not scored:
            return None
        best = max(scored, key=lambda entry: (entry[key], -entry["epoch"]))
        return {**best, "selected_by": f"{self.selection_split} recall@1"}

    def add_evaluation(self, epoch: int, step: int, splits: dict[str, dict[str, float]],
                       extra: dict[str, float]) -> bool:
        """Record one evaluation (plus `extra`, e.g. the epoch's train loss); return whether it is the new best.
        The files are written by `flush`, after the epoch's checkpoint."""
        entry = {"epoch": epoch, "step": step, **extra, **splits[self.selection_split], "splits": splits}
        self.history = [e for e in self.history if e["epoch"] != epoch] + [entry]
        for name, metrics in splits.items():
            self.scalars(epoch, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, f"eval_{name}")
        best = self.best()
        return best is not None and best["epoch"] == epoch

    def stop(self, reason: str, message: str, epoch: int, step: int) -> None:
        """Record that the run stopped early (e.g. `non_finite`: a diverged model) and why."""
        self.stopped = {"reason": reason, "epoch": epoch, "step": step, "message": message}
        self.flush()

    def flush(self) -> None:
        if not self.enabled:
            return
        data = {"epochs": self.history, "best": self.best(), "protocol": self._protocol(),
                "throughput": self.throughput, "embed_chunks": self.embed_chunks, "stopped": self.stopped}
        write_text_atomic(json.dumps(data, indent=2) + "\n", self.run_dir / "metrics.json")
        self._plot()
        if self._writer is not None:
            self._writer.flush()

    def _protocol(self) -> str:
        if self.selection_split == "val":
            return ("best epoch selected on the class-disjoint validation split (val recall@1); "
                    "test metrics reported at that epoch")
        return "best epoch selected on test recall@1 (the authors' protocol)"

    def _plot(self) -> None:
        if not self.history:
            return
        epochs = [entry["epoch"] for entry in self.history]
        ks = sorted({int(k.split("@")[1]) for entry in self.history for k in entry if k.startswith("recall@")})
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for k in ks:
            values = [entry.get(f"recall@{k}", float("nan")) for entry in self.history]
            ax.plot(epochs, values, marker="o", label=f"R@{k}")
        ax.set_xlabel("epoch (0 = before training)")
        ax.set_ylabel(f"{self.selection_split} Recall@K (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        (self.run_dir / "plots").mkdir(exist_ok=True)
        write_atomic(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), self.run_dir / "plots" / "recall_at_k.png")

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
