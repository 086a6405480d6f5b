"""One training run of the study and what it gave: completed, pruned, or failed (and why).

A run is an ordinary run directory trained by the engine's `Trainer`; this module adds the two
things the study needs around it: a callback after every evaluation (the tuner reports the
validation score there and may stop the run, `Pruned`), and the verdict on a run whose training
broke down. A run is *failed* when the engine stopped it (non-finite loss, gradients or weights;
metrics.json `stopped`), when an epoch's mean training loss is not finite, or when it diverged:
the epoch-mean loss grew to more than `DIVERGENCE_FACTOR` times the first epoch's magnitude (a
bounded loss cannot do that while training normally; an objective unbounded below, like the
original form of PCE, does). A failed run has no result: none of its epochs, epoch 0 included, is
ever reported.
"""
from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from unidml.engine.distributed import DistEnv
from unidml.engine.trackers import RunLabels
from unidml.engine.trainer import Trainer
from unidml.errors import RunEnded, UserError
from unidml.study.compare import run_state

DIVERGENCE_FACTOR = 100.0
TRAINED = 1  # the first epoch after training; epoch 0 is the untrained network


class Pruned(RunEnded):
    """Raised from the evaluation callback to stop a run the tuner gave up on (its trackers: killed)."""


@dataclass
class RunResult:
    """`status`: complete | pruned | failed; `history`: metrics.json's epochs; `reason` for a failure."""

    status: str
    history: list[dict] = field(default_factory=list)
    reason: str = ""


def objective_value(entry: dict, split: str, key: str) -> float:
    """`split`'s metric `key` (e.g. val recall@1) of one evaluation entry; NaN when it was not evaluated."""
    return float(entry.get("splits", {}).get(split, {}).get(key, math.nan))


def best_trained_entry(history: list[dict], split: str, key: str) -> dict | None:
    """The trained epoch (>= 1) with the highest `split` `key` (earliest on ties); None without one."""
    scored = [e for e in history if e["epoch"] >= TRAINED and math.isfinite(objective_value(e, split, key))]
    return max(scored, key=lambda e: (objective_value(e, split, key), -e["epoch"])) if scored else None


def failure_reason(history: list[dict], stopped: dict | None) -> str | None:
    """Why a run counts as failed (see the module docstring), or None for a healthy run."""
    if stopped:
        return f"stopped by the engine at epoch {stopped.get('epoch')}: {stopped.get('message', stopped.get('reason'))}"
    losses = [(e["epoch"], e["train_loss"]) for e in sorted(history, key=lambda e: e["epoch"]) if "train_loss" in e]
    for epoch, value in losses:
        if not math.isfinite(value):
            return f"non-finite training loss at epoch {epoch}"
    if losses:
        scale = DIVERGENCE_FACTOR * max(abs(losses[0][1]), 1.0)
        for epoch, value in losses:
            if abs(value) > scale:
                return (f"diverged: epoch-mean training loss {value:.4g} at epoch {epoch} "
                        f"(epoch {losses[0][0]}: {losses[0][1]:.4g})")
    return None


class _StudyTrainer(Trainer):
    """The engine's trainer plus a callback after each evaluation, evaluating only `splits`."""

    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv, splits: tuple[str, ...] | None,
                 on_evaluation: Callable[[dict], None] | None, labels: RunLabels | None = None) -> None:
        super().__init__(cfg, run_dir, env, labels)
        if splits is not None:
            self.evaluator.loaders = {name: pair for name, pair in self.evaluator.loaders.items() if name in splits}
        self.on_evaluation = on_evaluation

    def evaluate(self, extra: dict[str, float]) -> bool:
        is_best = super().evaluate(extra)
        if self.on_evaluation is not None:
            self.on_evaluation(max(self.record.history, key=lambda e: e["epoch"]))
        return is_best


def _stored(run_dir: Path) -> tuple[list[dict], dict | None]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return [], None
    data = json.loads(path.read_text())
    return data.get("epochs", []), data.get("stopped")


def train_run(cfg: DictConfig, run_dir: Path, env: DistEnv, split: str | None = None,
              on_evaluation: Callable[[dict], None] | None = None, labels: RunLabels | None = None) -> RunResult:
    """Train (or resume, or just read back) the run in `run_dir` and judge it; `labels` place it in the
    study's group of its trackers.

    `split` limits evaluation (a tuning trial evaluates only the validation split, so the test split
    is never looked at while tuning); `on_evaluation(entry)` may raise `Pruned`. A `UserError` from
    the engine (it stopped the run) makes a failed result; any other exception propagates, leaving
    the run resumable."""
    status, reason = "complete", ""
    if run_state(run_dir, cfg) != "done":
        trainer = None
        try:
            trainer = _StudyTrainer(cfg, run_dir, env, split, on_evaluation, labels)
            trainer.fit()
        except Pruned:
            status = "pruned"
            trainer.record.close()
        except UserError as exc:
            status, reason = "failed", str(exc)
        finally:
            del trainer
            gc.collect()
    history, stopped = _stored(run_dir)
    verdict = failure_reason(history, stopped)
    if verdict is not None:
        return RunResult("failed", history, verdict)
    return RunResult(status, history, reason)
