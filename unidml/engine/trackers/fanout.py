"""The trackers of one run behind one object: every call goes to each tracker `log.trackers` names.

`open_trackers` starts them once the run directory is claimed (main rank only), reopening the runs whose
ids a resumed run kept (the run record keeps them in `RUN_DIR/trackers.json`), so a resumed run continues
the same MLflow and W&B runs instead of opening new ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from unidml.engine.trackers.base import RunLabels, Tracker

IDS_FILE = "trackers.json"  # in the run directory: {tracker name: its run id}


class Trackers:
    """Fan-out over the trackers of a run (none: every call does nothing). Closed once, by `finish`."""

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = list(trackers or [])

    @property
    def writer(self):
        """The TensorBoard `SummaryWriter` when TensorBoard is a tracker (the embedding projector writes to it)."""
        return next((t.writer for t in self.trackers if t.name == "tensorboard"), None)

    def log_config(self, config: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_config(config)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_scalars(step, values)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_epoch(epoch, values)

    def log_summary(self, values: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_summary(values)

    def log_artifact(self, path: Path, folder: str = "") -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path, folder)

    def ids(self) -> dict[str, str]:
        """The run id of each tracker that has one (what a resumed run reopens)."""
        return {t.name: t.run_id for t in self.trackers if t.run_id is not None}

    def finish(self, status: str) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish(status)


def _build(name: str, cfg: DictConfig, run_dir: Path, labels: RunLabels, run_id: str | None) -> Tracker:
    if name == "tensorboard":
        from unidml.engine.trackers.tensorboard import TensorBoardTracker
        return TensorBoardTracker(run_dir)
    if name == "mlflow":
        from unidml.engine.trackers.mlflow_tracker import MlflowTracker
        return MlflowTracker(cfg.log.mlflow, run_dir, labels, run_id)
    from unidml.engine.trackers.wandb_tracker import WandbTracker
    return WandbTracker(cfg.log.wandb, run_dir, labels, run_id)


def open_trackers(cfg: DictConfig, run_dir: Path, labels: RunLabels | None = None,
                  known: dict[str, str] | None = None) -> Trackers:
    """Start every tracker of `log.trackers` for the run in `run_dir`; `known` ids (tracker name -> run id)
    are reopened instead of starting new runs."""
    known = known or {}
    return Trackers([_build(name, cfg, run_dir, labels or RunLabels(), known.get(name)) for name in cfg.log.trackers])
