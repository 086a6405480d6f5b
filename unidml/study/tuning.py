"""The study's work: per-loss tuning trials (Optuna) and the seeded retraining of each loss's choice.

Protocol (Musgrave et al., *A Metric Learning Reality Check*, ECCV 2020): every loss gets the same
budget, N trials of E epochs on the training classes, scored on the class-disjoint validation split
(the best trained epoch's val Recall@1, or MAP@R); the test split is not evaluated while tuning.
Trial 0 of each loss trains its recipe's own setting (the values its config holds at every searched
key, where the space contains them), so the search starts from the recipe's score; TPE draws the
other trials' values from the loss's `search:` space; the median rule stops a trial whose best val
score so far, at an epoch before its last, falls below the median of the completed trials at that
epoch (at the last epoch stopping saves nothing, so the trial completes). It acts only once
`prune_startup_trials` trials completed and from epoch `prune_warmup_share` x the trial's epochs
on (half by default): validation Recall@1 of a run trained from scratch often dips below the
untrained network in its first epochs and recovers, so an early median cuts late bloomers. The
best completed trial's setting is then retrained for the full epochs with seeds 0..S-1 and
reported on test, at the epoch each retraining selects on val.

Every run is an ordinary run directory (`OUT/<loss>/trial<k>`, `OUT/<loss>/seed<s>`). Each loss's
Optuna study lives in a database (SQLite under OUT by default, or any SQLAlchemy URL), and tasks
are handed out by leases (`leases.py`), so workers (processes, nodes, torchrun jobs) share a study
without running a task twice, and a killed study resumes: finished trials are kept, an interrupted
trial keeps its drawn values and resumes from its checkpoint. Trial k draws with a TPE sampler
seeded by (seed, k) from the trials finished before it, so a single worker that was interrupted
and restarted draws exactly what an uninterrupted one draws.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna
from omegaconf import OmegaConf
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from unidml.engine.distributed import DistEnv
from unidml.errors import UserError
from unidml.seeding import derived_seed
from unidml.study.compare import LOG_SECTION, LossPlan, _first_difference, without_log
from unidml.study.leases import TaskLeases
from unidml.study.runs import Pruned, RunResult, best_trained_entry, objective_value, train_run
from unidml.study.search_space import params_of, suggest, values_of
from unidml.study.tracking import StudyGroup

SLOT = "unidml_slot"  # trial user attribute: the budget slot 0..N-1 the trial fills
FAILURE = "unidml_failure"  # trial user attribute: why a failed trial failed
SETTINGS = "unidml_settings"  # study user attribute: what the study was created for
OUTCOME = "study_outcome.json"  # in a retraining's run directory: its status and the setting it retrained
VAL = "val"


@dataclass(frozen=True)
class StudySettings:
    """What every loss of the study shares."""

    out: Path
    trials: int
    seeds: int
    trial_epochs: int | None = None  # None: the config's train.epochs
    objective: str = "recall@1"
    seed: int = 0  # the sampler's seed; trials train with train.seed = trial_seed
    trial_seed: int = 0
    prune: bool = True
    prune_startup_trials: int = 3  # completed trials before the median rule applies
    prune_warmup_share: float = 0.5  # no trial is stopped before this share of its epochs
    startup_trials: int | None = None  # random draws before TPE; None: min(10, max(2, N // 2))
    name: str = "compare"
    poll_seconds: float = 10.0

    def prune_after(self, epochs: int) -> int:
        """The earliest epoch at which a trial of `epochs` epochs can be stopped (at least 1)."""
        return max(1, math.ceil(self.prune_warmup_share * epochs - 1e-9))

    @property
    def tpe_startup(self) -> int:
        return self.startup_trials if self.startup_trials is not None else min(10, max(2, self.trials // 2))


@dataclass(frozen=True)
class Task:
    """One unit of work: trial `index` of a loss's tuning, or its retraining with seed `index`."""

    loss: str
    kind: str  # trial | seed
    index: int
    values: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index}"


WAIT = "wait"


class SlotSeededTPE(BaseSampler):
    """TPE whose randomness depends only on (seed, trial slot): a fresh `TPESampler` per slot, so the
    values of trial k depend on the finished trials before it and not on what this process drew before."""

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self.seed, self.n_startup_trials = seed, n_startup_trials
        self._by_slot: dict[int, TPESampler] = {}

    def _for(self, trial: FrozenTrial) -> TPESampler:
        slot = int(trial.user_attrs.get(SLOT, trial.number))
        if slot not in self._by_slot:
            self._by_slot[slot] = TPESampler(seed=derived_seed(self.seed, slot) % 2**32,
                                             n_startup_trials=self.n_startup_trials, constant_liar=True)
        return self._by_slot[slot]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)


def _broadcast(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank (the object itself without a process group)."""
    if not env.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def open_storage(url: str, attempts: int = 20) -> tuple[optuna.storages.RDBStorage, TaskLeases]:
    """The study database and its lease table (SQLite waits up to a minute for a writer instead of failing).

    Workers that start together race to create the schema; the loser's attempt fails (a table or
    version row that appeared meanwhile) and is retried once the winner's schema is there."""
    import sqlalchemy.exc

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            leases = TaskLeases(storage.engine)
            return storage, leases
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as exc:
            if attempt + 1 == attempts or "already exists" not in str(exc) and "UNIQUE" not in str(exc):
                error = exc
                break
            time.sleep(0.5)
        except Exception as exc:  # SQLAlchemy or driver errors: name the URL, one line
            error = exc
            break
    message = str(error).splitlines()[0] if str(error) else ""
    raise UserError(f"--storage {url}: cannot open the study database ({type(error).__name__}: {message})") from None


def report_and_check(trial: optuna.Trial, entry: dict, last_epoch: int, objective: str) -> bool:
    """Report an evaluated epoch's val score to `trial`; whether the median rule stops the trial now.
    The last epoch is only reported: stopping there saves no training and would drop a finished trial
    from the choice."""
    epoch = entry["epoch"]
    value = objective_value(entry, VAL, objective)
    if math.isfinite(value):
        trial.report(value, epoch)
    return epoch < last_epoch and trial.should_prune()


class LossStudies:
    """Rank 0's handle on the study database: one Optuna study per loss, and the task leases."""

    def __init__(self, settings: StudySettings, plans: Sequence[LossPlan], storage_url: str,
                 stale_after: float = 600.0, create: bool = True) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.settings, self.plans = settings, {p.loss: p for p in plans}
        self.storage, self.leases = open_storage(storage_url)
        self.leases.stale_after = stale_after
        self.studies: dict[str, optuna.Study] = {}
        if settings.trials:
            for plan in plans:
                self.studies[plan.loss] = self._open(plan, create)

    def study_name(self, loss: str) -> str:
        return f"{self.settings.name}:{loss}"

    def fingerprint(self, plan: LossPlan) -> dict[str, Any]:
        """What a loss's trials depend on (not where they are tracked); a study created for other settings is
        refused."""
        s = self.settings
        overrides = [item for item in plan.overrides if not item.startswith(f"{LOG_SECTION}.")]
        data = {"config": without_log(plan.mapping), "overrides": overrides, "trials": s.trials,
                "search": [dataclasses.asdict(d) for d in plan.dims], "trial_epochs": s.trial_epochs,
                "objective": s.objective, "seed": s.seed, "trial_seed": s.trial_seed, "prune": s.prune,
                "prune_startup_trials": s.prune_startup_trials, "prune_warmup_share": s.prune_warmup_share,
                "startup_trials": s.tpe_startup, "first_trial": "recipe"}
        return json.loads(json.dumps(data))

    def _open(self, plan: LossPlan, create: bool) -> optuna.Study:
        s, name = self.settings, self.study_name(plan.loss)
        sampler = SlotSeededTPE(s.seed, s.tpe_startup)
        pruner = optuna.pruners.NopPruner()
        if s.prune:
            epochs = s.trial_epochs or int(plan.config(s.trial_seed).train.epochs)
            pruner = optuna.pruners.MedianPruner(n_startup_trials=s.prune_startup_trials,
                                                 n_warmup_steps=s.prune_after(epochs))
        if create:
            study = optuna.create_study(study_name=name, storage=self.storage, direction="maximize",
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
        else:
            try:
                study = optuna.load_study(study_name=name, storage=self.storage, sampler=sampler, pruner=pruner)
            except KeyError:
                raise UserError(f"study '{name}' not found in the study database (nothing ran yet?)") from None
        wanted, stored = self.fingerprint(plan), study.user_attrs.get(SETTINGS)
        if stored is None and create:
            study.set_user_attr(SETTINGS, wanted)
        elif stored is not None and stored != wanted:
            raise UserError(f"study '{name}' was created with other settings ({_first_difference(stored, wanted)}); "
                            f"use another --out or --study-name")
        return study

    # ---------------------------------------------------------------- trials
    def slot_trials(self, loss: str) -> dict[int, FrozenTrial]:
        """The Optuna trial filling each budget slot of `loss` (the first one, should there be more)."""
        found: dict[int, FrozenTrial] = {}
        for trial in self.studies[loss].get_trials(deepcopy=False):
            slot = trial.user_attrs.get(SLOT)
            if slot is not None and int(slot) not in found:
                found[int(slot)] = trial
        return found

    def best(self, loss: str) -> FrozenTrial | None:
        """The completed trial with the highest objective (lowest slot on ties); None without one."""
        done = [t for slot, t in sorted(self.slot_trials(loss).items())
                if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
        return max(done, key=lambda t: (t.value, -int(t.user_attrs[SLOT]))) if done else None

    def recipe_values(self, loss: str) -> dict[str, Any]:
        """The loss's recipe setting in its search space, as trial parameters: the config's value at every
        searched key that the space contains, a conditional key only on its recipe branch (others are
        left to the sampler)."""
        plan = self.plans[loss]
        cfg = plan.config(self.settings.trial_seed)  # the seed and epochs are never searched keys
        return params_of({d.key: OmegaConf.select(cfg, d.key) for d in plan.dims}, plan.dims)

    def start_trial(self, loss: str, slot: int) -> optuna.Trial | None:
        """The running Optuna trial of `slot` (created, or taken over from a dead worker); None when
        that trial already finished (its worker died after telling it)."""
        study = self.studies[loss]
        frozen = self.slot_trials(loss).get(slot)
        if frozen is None:
            study.enqueue_trial(self.recipe_values(loss) if slot == 0 else {}, user_attrs={SLOT: slot})
            frozen = self.slot_trials(loss)[slot]
        if frozen.state.is_finished():
            return None
        waiting = frozen.state == TrialState.WAITING
        if waiting and not self.storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING):
            raise RuntimeError(f"trial slot {slot} of {loss} was started by another worker despite its lease")
        return optuna.Trial(study, frozen._trial_id)

    # ---------------------------------------------------------------- tasks
    def _free(self, study: str, task: str, leases: dict) -> bool:
        lease = leases.get(task)
        return (lease is None or self.leases.is_stale(lease)) and self.leases.claim(study, task)

    def next_task(self) -> Task | str | None:
        """Claim the next task (trials of each loss first, then its retrainings once its tuning is
        complete); `WAIT` when only tasks held by other workers remain, None when all are done."""
        pending = False
        for loss in self.plans:
            name = self.study_name(loss)
            leases = self.leases.all(name)
            trials = [f"trial{k}" for k in range(self.settings.trials)]
            for k, task in enumerate(trials):
                if self._free(name, task, leases):
                    return Task(loss, "trial", k)
            if not all(t in leases and leases[t].done for t in trials):
                pending = True
                continue
            values: dict[str, Any] = {}
            if self.settings.trials:
                best = self.best(loss)
                if best is None:
                    continue  # no completed trial: nothing to retrain (the report says so)
                values = values_of(best.params, self.plans[loss].dims)
            seeds = [f"seed{s}" for s in range(self.settings.seeds)]
            for s, task in enumerate(seeds):
                if self._free(name, task, leases):
                    return Task(loss, "seed", s, values)
            pending = pending or not all(t in leases and leases[t].done for t in seeds)
        return WAIT if pending else None


def run_dir(out: Path, task: Task) -> Path:
    return out / task.loss / task.name


def _tell(study: optuna.Study, trial: optuna.Trial, result: RunResult, objective: str) -> str:
    """Finish the Optuna trial from its run's result; returns a one-line summary."""
    if result.status == "complete":
        entry = best_trained_entry(result.history, VAL, objective)
        if entry is None:
            result = RunResult("failed", result.history, "no finite validation score after training")
        else:
            value = objective_value(entry, VAL, objective)
            study.tell(trial, value, skip_if_finished=True)
            return f"val {objective} {value:.2f} (epoch {entry['epoch']})"
    if result.status == "pruned":
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        return f"pruned at epoch {max(e['epoch'] for e in result.history)}"
    trial.set_user_attr(FAILURE, result.reason)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    return f"failed: {result.reason}"


class StudyWorker:
    """One worker of the study: a process, or every rank of a torchrun job (rank 0 holds the database)."""

    def __init__(self, settings: StudySettings, plans: Sequence[LossPlan], env: DistEnv,
                 studies: LossStudies | None, group: StudyGroup | None = None) -> None:
        """`group`: the study's group in the trackers (rank 0), so each run is named and nested in it."""
        self.settings, self.plans, self.env, self.studies = settings, {p.loss: p for p in plans}, env, studies
        self.group = group

    def run(self) -> int:
        """Work until every task of the study is done; returns how many tasks this worker ran.

        The rank protocol is two messages, each one broadcast from rank 0: per task, the planned task
        (`_plan`: the next task with its drawn values, `skip`, `WAIT` or None for done), and per evaluation of
        a trial, whether to prune it (in `_train`). Every rank therefore makes the same calls in the same order.
        """
        ran = 0
        while True:
            with contextlib.ExitStack() as lease:
                task, trial = self._plan(lease) if self.env.is_main else (None, None)
                task = _broadcast(task, self.env)
                if task is None:
                    return ran
                if task == WAIT:
                    if self.env.is_main:
                        time.sleep(self.settings.poll_seconds)
                    continue
                self._train(task, trial)
                if self.env.is_main and task.kind != "skip":
                    self.studies.leases.finish(self.studies.study_name(task.loss), task.name)
                ran += 1

    def _plan(self, lease: contextlib.ExitStack) -> tuple[Task | None, optuna.Trial | None]:
        """Rank 0: the next task, its lease held in `lease` and, for a trial, its Optuna trial and drawn values
        (a trial another worker started meanwhile becomes `skip`)."""
        studies = self.studies
        task = studies.next_task()
        if task is None or task == WAIT:
            return task, None
        name = studies.study_name(task.loss)
        lease.enter_context(studies.leases.holding(name, task.name))
        if task.kind != "trial":
            return task, None
        trial = studies.start_trial(task.loss, task.index)
        if trial is None:
            studies.leases.finish(name, task.name)
            return dataclasses.replace(task, kind="skip"), None
        return dataclasses.replace(task, values=suggest(trial, self.plans[task.loss].dims)), trial

    def _say(self, task: Task, text: str) -> None:
        if self.env.is_main:
            print(f"[{task.loss} {task.name}] {text}", flush=True)

    def _train(self, job: Task, trial: optuna.Trial | None) -> None:
        """Train `job` on every rank; rank 0 (which holds `trial`) reports, prunes and records."""
        if job.kind == "skip":
            return
        s, plan, env = self.settings, self.plans[job.loss], self.env
        directory = run_dir(s.out, job)
        is_trial = job.kind == "trial"
        cfg = plan.config(s.trial_seed if is_trial else job.index, job.values, s.trial_epochs if is_trial else None)
        self._say(job, f"{'trial' if is_trial else 'retraining'} {_format(job.values)} -> {directory}")

        def report(entry: dict) -> None:
            epoch = entry["epoch"]
            if epoch < 1:
                return
            stop = env.is_main and report_and_check(trial, entry, cfg.train.epochs, s.objective)
            if _broadcast(stop, env):
                raise Pruned(f"epoch {epoch}")

        labels = self.group.labels(job.loss, job.name, job.kind) if self.group is not None else None
        result = train_run(cfg, directory, env, split=VAL if is_trial else None,
                           on_evaluation=report if is_trial else None, labels=labels)
        if not env.is_main:
            return
        if is_trial:
            self._say(job, _tell(self.studies.studies[job.loss], trial, result, s.objective))
            return
        outcome = {"status": result.status, "reason": result.reason, "values": job.values,
                   "trial": _chosen_slot(self.studies, job.loss)}
        (directory / OUTCOME).write_text(json.dumps(outcome, indent=2) + "\n")
        self._say(job, result.status + (f": {result.reason}" if result.reason else ""))


def _chosen_slot(studies: LossStudies, loss: str) -> int | None:
    best = studies.best(loss) if studies.settings.trials else None
    return None if best is None else int(best.user_attrs[SLOT])


def _format(values: dict[str, Any]) -> str:
    if not values:
        return "(recipe settings)"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
