"""MLflow through `MlflowClient` (no global active run, so a study's runs follow each other in one process).

`log.mlflow.tracking_uri` defaults to the file store `file:./mlruns`, read from the working directory
as MLflow itself does; MLflow 3 refuses a file store unless `MLFLOW_ALLOW_FILE_STORE=true`, which is set
for a `file:` URI (the user asked for that store). Metric names keep their TensorBoard tags with the
characters MLflow refuses replaced (`recall@1` -> `recall_at_1`); params are the resolved config as
dotted keys; a study's runs are children of its parent run (`mlflow.parentRunId`).
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from unidml.engine.trackers.base import FAILED, FINISHED, KILLED, RunLabels, flatten

log = logging.getLogger(__name__)
STATUS = {FINISHED: "FINISHED", FAILED: "FAILED", KILLED: "KILLED"}
PARENT_TAG = "mlflow.parentRunId"
BATCH = 100  # MLflow's limit of params per request


def tracking_uri(text: str) -> str:
    """The tracking URI with a relative file store (or a plain path) made absolute from the working directory."""
    if "://" in text and not text.startswith("file://"):
        return text  # sqlite:///..., http(s)://..., databricks://...
    path = re.sub(r"^file:(//)?", "", text)
    return Path(path).expanduser().resolve().as_uri()


def metric_name(tag: str) -> str:
    """A TensorBoard tag as an MLflow metric name (letters, digits, `_ - . / : space`)."""
    return re.sub(r"[^\w\-./: ]", "_", tag.replace("@", "_at_"))


def client(section: Any):
    """An `MlflowClient` on `log.mlflow.tracking_uri` and the id of the experiment `log.mlflow.experiment`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(str(section.tracking_uri))
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow = MlflowClient(tracking_uri=uri)
    name = str(section.experiment)
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow, mlflow.create_experiment(name), uri
        except MlflowException:  # another process created it meanwhile
            found = mlflow.get_experiment_by_name(name)
    return mlflow, found.experiment_id, uri


def open_parent(section: Any, name: str, tags: dict[str, str], run_id: str | None = None) -> str:
    """The parent run of a group (a study): `run_id` reopened when given, else a new run."""
    mlflow, experiment, _ = client(section)
    if run_id is not None:
        mlflow.update_run(run_id, status="RUNNING")
        return run_id
    return mlflow.create_run(experiment, run_name=name, tags=tags).info.run_id


def close_parent(section: Any, run_id: str, files: list[Path]) -> None:
    """Attach the group's own files (a study's report) to its parent run and mark it finished."""
    mlflow, _, _ = client(section)
    for path in files:
        mlflow.log_artifact(run_id, str(path))
    mlflow.set_terminated(run_id, "FINISHED")


class MlflowTracker:
    """One MLflow run; `run_id` given reopens a resumed run (its params are kept: MLflow never changes one)."""

    name = "mlflow"

    def __init__(self, section: Any, run_dir: Path, labels: RunLabels, run_id: str | None = None) -> None:
        from mlflow.entities import Metric, Param

        self._metric, self._param = Metric, Param
        self.mlflow, experiment, uri = client(section)
        self.resumed = run_id is not None
        if self.resumed:
            self.mlflow.update_run(run_id, status="RUNNING")
        else:
            tags = {"unidml.run_dir": str(run_dir.resolve()), **labels.tags}
            if labels.group:
                tags["unidml.group"] = labels.group
            if self.name in labels.parents:
                tags[PARENT_TAG] = labels.parents[self.name]
            run_id = self.mlflow.create_run(experiment, run_name=labels.name or run_dir.name, tags=tags).info.run_id
        self.run_id = run_id
        log.info("MLflow run %s in %s (experiment %s)", run_id, uri, section.experiment)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(metric_name(k), float(v), now, step) for k, v in values.items()]
        self.mlflow.log_batch(self.run_id, metrics=metrics)

    def log_config(self, config: dict[str, Any]) -> None:
        if self.resumed:
            return
        params = [self._param(key, value) for key, value in flatten(config).items()]
        for start in range(0, len(params), BATCH):
            self.mlflow.log_batch(self.run_id, params=params[start:start + BATCH])

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self._metrics(values, step)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self._metrics(values, epoch)

    def log_summary(self, values: dict[str, Any]) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._metrics(numbers, 0)
        for key, value in values.items():
            if key not in numbers:
                self.mlflow.set_tag(self.run_id, metric_name(key), str(value))

    def log_artifact(self, path: Path, folder: str = "") -> None:
        self.mlflow.log_artifact(self.run_id, str(path), folder or None)

    def finish(self, status: str) -> None:
        self.mlflow.set_terminated(self.run_id, STATUS[status])
