"""What the study produced, read back for the report: every trial and every retraining of each loss,
with the budget each consumed (epochs trained, images seen), from the study database and run directories."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import yaml
from optuna.trial import TrialState

from unidml.study.compare import LossPlan
from unidml.study.runs import best_trained_entry, failure_reason
from unidml.study.search_space import values_of
from unidml.study.tuning import FAILURE, OUTCOME, SLOT, LossStudies, StudySettings, Task, run_dir


@dataclass
class Usage:
    """Training a run did: epochs trained and images seen (optimizer steps x global batch x accumulation)."""

    epochs: int = 0
    images: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.epochs + other.epochs, self.images + other.images)


@dataclass
class TrialRow:
    slot: int
    state: str  # complete | pruned | failed | running | waiting | not started
    value: float | None  # the objective; for a pruned trial its last reported score
    params: dict[str, Any]
    reason: str
    usage: Usage


@dataclass
class SeedRow:
    """One retraining: `status` complete | failed | missing; `selected` its reported epoch entry."""

    seed: int
    status: str
    reason: str
    history: list[dict]
    selected: dict | None
    usage: Usage
    directory: Path | None = None  # the retraining's run directory (its metrics.json and plots/)


@dataclass
class LossResult:
    loss: str
    recipe: str
    dims: list[str]
    trials: list[TrialRow] = field(default_factory=list)
    chosen: TrialRow | None = None
    seeds: list[SeedRow] = field(default_factory=list)

    @property
    def finished_seeds(self) -> list[SeedRow]:
        return [s for s in self.seeds if s.status == "complete" and s.selected is not None]


def run_usage(directory: Path) -> Usage:
    """Epochs trained and images seen by the run in `directory` (nothing when it has no metrics)."""
    metrics, config = directory / "metrics.json", directory / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        return Usage()
    history = json.loads(metrics.read_text()).get("epochs", [])
    if not history:
        return Usage()
    last = max(history, key=lambda e: e["epoch"])
    train = (yaml.safe_load(config.read_text()) or {}).get("train", {})
    per_step = int(train.get("batch_size", 0)) * int(train.get("grad_accum", 1))
    return Usage(int(last["epoch"]), int(last["step"]) * per_step)


def _state(trial) -> str:
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
            TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[trial.state]


def _seed_row(directory: Path, seed: int, objective: str, select_split: str) -> SeedRow:
    metrics, config = directory / "metrics.json", directory / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        return SeedRow(seed, "missing", "not trained yet", [], None, Usage())
    data = json.loads(metrics.read_text())
    history, usage = data.get("epochs", []), run_usage(directory)
    outcome = json.loads((directory / OUTCOME).read_text()) if (directory / OUTCOME).is_file() else {}
    reason = failure_reason(history, data.get("stopped"))
    if reason is None and outcome.get("status") == "failed":
        reason = outcome.get("reason") or "failed"
    if reason:
        return SeedRow(seed, "failed", reason, history, None, usage)
    epochs = int(((yaml.safe_load(config.read_text()) or {}).get("train") or {}).get("epochs", 0))
    if usage.epochs < epochs:
        return SeedRow(seed, "missing", f"not finished (epoch {usage.epochs} of {epochs})", history, None, usage)
    selected = best_trained_entry(history, select_split, objective)
    if selected is None:
        return SeedRow(seed, "failed", f"no finite {select_split} {objective} after training", history, None, usage)
    return SeedRow(seed, "complete", "", history, selected, usage)


def collect(settings: StudySettings, plans: Sequence[LossPlan], studies: LossStudies | None,
            select_split: str, recipes: dict[str, str]) -> list[LossResult]:
    """Every loss's trials (from the database) and retrainings (from their run directories)."""
    results = []
    for plan in plans:
        result = LossResult(plan.loss, recipes.get(plan.loss, ""), [f"{d.key} {d.describe()}" for d in plan.dims])
        if settings.trials and studies is not None:
            trials = studies.slot_trials(plan.loss)
            for slot in range(settings.trials):
                trial = trials.get(slot)
                if trial is None:
                    result.trials.append(TrialRow(slot, "not started", None, {}, "", Usage()))
                    continue
                value = trial.value if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) else None
                result.trials.append(TrialRow(slot, _state(trial), value, values_of(trial.params, plan.dims),
                                              trial.user_attrs.get(FAILURE, ""),
                                              run_usage(run_dir(settings.out, Task(plan.loss, "trial", slot)))))
            best = studies.best(plan.loss)
            if best is not None:
                result.chosen = next(r for r in result.trials if r.slot == int(best.user_attrs[SLOT]))
        for seed in range(settings.seeds):
            directory = run_dir(settings.out, Task(plan.loss, "seed", seed))
            row = _seed_row(directory, seed, settings.objective, select_split)
            result.seeds.append(replace(row, directory=directory))
        results.append(result)
    return results


def retraining_rates(results: Sequence[LossResult]) -> dict[str, float]:
    """loss -> mean training images/s (last epoch, metrics.json `throughput`) of its finished retrainings."""
    rates = {}
    for result in results:
        found = [json.loads((s.directory / "metrics.json").read_text()).get("throughput", {}).get("images_per_s")
                 for s in result.finished_seeds if s.directory is not None and (s.directory / "metrics.json").is_file()]
        found = [rate for rate in found if isinstance(rate, (int, float))]
        if found:
            rates[result.loss] = sum(found) / len(found)
    return rates
