"""What every experiment tracker receives, and how a run is named and grouped in one.

A tracker (TensorBoard, MLflow, W&B) gets, from the main rank only: the resolved config once
(`log_config`), the per-step scalars (`log_scalars`: `train/loss`, `train/lr`, ...), the per-epoch
values of every evaluated split and the diagnostics (`log_epoch`: `eval_val/recall@1`,
`diagnostics/mi_knn`, ...), the selected epoch (`log_summary`: `best/epoch`, `best/test/recall@1`,
`best/checkpoint`, ...), the run directory's files (`log_artifact`) and how the run ended (`finish`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from unidml.errors import RunEnded

FINISHED, FAILED, KILLED = "finished", "failed", "killed"


class Tracker(Protocol):
    """One experiment tracker's run. `run_id` is what a resumed run reopens (None: nothing to reopen)."""

    name: str
    run_id: str | None

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_scalars(self, step: int, values: dict[str, float]) -> None: ...

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None: ...

    def log_summary(self, values: dict[str, Any]) -> None: ...

    def log_artifact(self, path: Path, folder: str = "") -> None: ...

    def finish(self, status: str) -> None: ...


@dataclass(frozen=True)
class RunLabels:
    """How a run appears in the trackers: its name, its group (a study) and the group's parent run per
    tracker (MLflow nests child runs under it), plus tags. A plain `unidml train` run has none."""

    name: str = ""
    group: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    parents: dict[str, str] = field(default_factory=dict)


def status_of(exc: BaseException | None) -> str:
    """How a run ended: finished, killed (interrupted, or ended on purpose: `RunEnded`), or failed."""
    if exc is None:
        return FINISHED
    return KILLED if isinstance(exc, (KeyboardInterrupt, RunEnded)) else FAILED


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"train": {"lr": 0.1}}` -> `{"train.lr": "0.1"}`: the config as flat key/value params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out
