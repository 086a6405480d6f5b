"""The study as a group in its experiment trackers: every trial and retraining is a run of the group.

The group is named `<study directory>:<study name>` (W&B `group=`); MLflow gets a parent run of that name,
and each run of the study is its child (`mlflow.parentRunId`), tagged with its loss and task. The
parent's id is kept in `OUT/trackers.json`, taken under a lock on `OUT/.trackers.lock`, so workers that
share the study (and a resumed study) use one parent; the report's files are attached to it at the end.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from unidml.engine.trackers import IDS_FILE, RunLabels

LOCK = ".trackers.lock"


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class StudyGroup:
    """The study's group in the trackers of `log.trackers` (rank 0 opens it; the labels go to each run)."""

    def __init__(self, cfg: DictConfig, out: Path, name: str) -> None:
        self.cfg, self.out = cfg, out
        self.name = f"{out.resolve().name}:{name}"
        self.parents: dict[str, str] = {}
        if "mlflow" in cfg.log.trackers:
            self.parents["mlflow"] = self._mlflow_parent()

    def _mlflow_parent(self) -> str:
        from unidml.engine.trackers.mlflow_tracker import open_parent, tracking_uri

        section = self.cfg.log.mlflow
        where = {"tracking_uri": tracking_uri(str(section.tracking_uri)), "experiment": str(section.experiment)}
        path = self.out / IDS_FILE
        with _locked(self.out):
            known = json.loads(path.read_text()) if path.is_file() else {}
            same = known.get("mlflow", {}).get("where") == where
            run_id = open_parent(section, self.name, {"unidml.study": self.name, "unidml.study_dir":
                                                      str(self.out.resolve())},
                                 known["mlflow"]["run_id"] if same else None)
            path.write_text(json.dumps({**known, "mlflow": {"run_id": run_id, "where": where}}, indent=2) + "\n")
        return run_id

    def labels(self, loss: str, task: str, kind: str) -> RunLabels:
        """How the run `task` (trial3, seed0) of `loss` appears: `<loss>/<task>`, in the group, under the parent."""
        return RunLabels(name=f"{loss}/{task}", group=self.name, parents=dict(self.parents),
                         tags={"unidml.loss": loss, "unidml.task": task, "unidml.kind": kind})

    def close(self, files: list[Path]) -> None:
        """Attach the report's `files` to the parent runs and end them."""
        if "mlflow" in self.parents:
            from unidml.engine.trackers.mlflow_tracker import close_parent

            close_parent(self.cfg.log.mlflow, self.parents["mlflow"], files)
