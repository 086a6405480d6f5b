"""What a run leaves behind (rank 0 only): metrics.json, PNG plots, and what its trackers receive
(`log.trackers`: TensorBoard by default, MLflow, W&B; `unidml.engine.trackers`).

`plots/recall_at_k.png` and `plots/train_loss.png` are drawn by `run_plots`.
`metrics.json` holds one entry per evaluated epoch (`epoch`, `recall@K`..., `map@r`,
`r_precision`, the query counts `num_queries`, `excluded_queries`, `unreadable_images`, and every
evaluated split under `splits`), the `best` entry with the protocol that selected it, training
throughput, `embed_chunks` (K, whether the chunked gradient is exact, and the train-mode BatchNorm
layers that make it inexact) and `stopped` (null, or why the run stopped early: `{"reason": "non_finite", ...}`).
It is rewritten atomically once the evaluated epoch's checkpoint is written (`flush`, called by the
trainer after each save), so it never lists an epoch that no checkpoint holds; a full disk fails with
one line and leaves the previous file intact. The trackers get the per-step and per-epoch scalars as
they come, and at the end the selected epoch and the run directory's files (`finish_tracking`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from unidml.engine.run_plots import plot_recall, plot_train_loss
from unidml.engine.trackers import FINISHED, IDS_FILE, RunLabels, Trackers, open_trackers, status_of
from unidml.errors import UserError

ARTIFACTS = ("config.yaml", "metrics.json", "train.log", "plots/*.png")  # given to the trackers at the end


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
        self.trackers = Trackers()

    @property
    def writer(self):
        """The TensorBoard writer while TensorBoard tracks the run (rank 0 only), else None."""
        return self.trackers.writer

    @contextlib.contextmanager
    def tracking(self, cfg: DictConfig, labels: RunLabels | None = None) -> Iterator[None]:
        """The trackers of `log.trackers` open (with the resolved config) for the duration of the block; an
        exception ends them as failed, or killed (interrupted, `RunEnded`). Call once the run directory is ours.
        Their run ids are kept in `trackers.json`: a resumed run (not `train.resume=never`) continues them."""
        if self.enabled:
            path = self.run_dir / IDS_FILE
            known = json.loads(path.read_text()) if path.is_file() and cfg.train.resume != "never" else {}
            self.trackers = open_trackers(cfg, self.run_dir, labels, known)
            if self.trackers.ids():
                write_text_atomic(json.dumps(self.trackers.ids(), indent=2) + "\n", path)
            self.trackers.log_config(OmegaConf.to_container(cfg, resolve=True))
        try:
            yield
        except BaseException as exc:
            self.finish_tracking(status_of(exc))
            raise

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        """Per-step scalars (`prefix/key`) to every tracker."""
        self.trackers.log_scalars(step, {f"{prefix}/{key}": value for key, value in values.items()})

    def epoch_scalars(self, epoch: int, values: dict[str, float], prefix: str) -> None:
        """Per-epoch values (`prefix/key`, e.g. the diagnostics) to every tracker."""
        self.trackers.log_epoch(epoch, {f"{prefix}/{key}": value for key, value in values.items()})

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
        self.trackers.log_epoch(epoch, {f"eval_{name}/{k}": v for name, metrics in splits.items()
                                        for k, v in metrics.items() if isinstance(v, (int, float))})
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

    def _protocol(self) -> str:
        if self.selection_split == "val":
            return ("best epoch selected on the class-disjoint validation split (val recall@1); "
                    "test metrics reported at that epoch")
        return "best epoch selected on test recall@1 (the authors' protocol)"

    def _plot(self) -> None:
        if not self.history:
            return
        plots = self.run_dir / "plots"
        plots.mkdir(exist_ok=True)
        best = self.best()
        plot_recall(self.history, self.selection_split, best["epoch"] if best else None, plots / "recall_at_k.png",
                    write_atomic)
        plot_train_loss(self.history, plots / "train_loss.png", write_atomic)

    def summary(self) -> dict[str, Any]:
        """The selected epoch for the trackers: `best/epoch`, `best/selected_by`, `best/checkpoint` (its path)
        and `best/<split>/<metric>` of every evaluated split."""
        best = self.best()
        if best is None:
            return {}
        values: dict[str, Any] = {"best/epoch": best["epoch"], "best/selected_by": best["selected_by"]}
        checkpoint = self.run_dir / "checkpoints" / "best.pt"
        if checkpoint.is_file():
            values["best/checkpoint"] = str(checkpoint.resolve())
        for split, metrics in best["splits"].items():
            values.update({f"best/{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        return values

    def finish_tracking(self, status: str) -> None:
        """Give the trackers the selected epoch and the run directory's files, then end their runs as `status`."""
        if not self.trackers.trackers:
            return
        summary = self.summary()
        if summary:
            self.trackers.log_summary(summary)
        for pattern in ARTIFACTS:
            for path in sorted(self.run_dir.glob(pattern)):
                self.trackers.log_artifact(path, str(path.parent.relative_to(self.run_dir)).strip("."))
        self.trackers.finish(status)

    def close(self) -> None:
        """Write the files a last time and end the trackers' runs as finished."""
        self.flush()
        self.finish_tracking(FINISHED)
