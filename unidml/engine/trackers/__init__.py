"""Experiment trackers (`log.trackers`: tensorboard, mlflow, wandb): one `Tracker` interface, one module per
tracker, and the fan-out (`Trackers`) the run record calls (docs/design.md, "Experiment trackers")."""
from unidml.engine.trackers.base import FAILED, FINISHED, KILLED, RunLabels, Tracker, flatten, status_of
from unidml.engine.trackers.fanout import IDS_FILE, Trackers, open_trackers

__all__ = ["FAILED", "FINISHED", "IDS_FILE", "KILLED", "RunLabels", "Tracker", "Trackers", "flatten",
           "open_trackers", "status_of"]
