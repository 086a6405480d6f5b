"""Tuning with Optuna: seeded TPE draws that a resumed study repeats, a killed study that resumes to the same
tables without retraining finished trials, two workers sharing one SQLite study, failed trials."""
import csv
import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import fault_injection
import optuna
import pytest
import yaml

from unidml.study.compare import LossPlan
from unidml.study.runs import RunResult
from unidml.study.search_space import Dimension, suggest
from unidml.study.tuning import FAILURE, LossStudies, StudySettings, _tell, report_and_check

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
DIMS = (Dimension("train.lr", 1e-3, 1e-1, log=True), Dimension("loss.label_smoothing", 0.0, 0.3),
        Dimension("data.m_per_class", choices=(2, 4, 8)))


def recipe_plan(dims=DIMS) -> LossPlan:
    """CE on the quickstart config (train.lr 0.1, label smoothing 0.1) searched over `dims`."""
    return LossPlan("cross_entropy", str(QUICKSTART), yaml.safe_load(QUICKSTART.read_text()), dims)


def score(values) -> float:
    """A deterministic objective with its optimum inside the space."""
    lr, smoothing, m = values["train.lr"], values["loss.label_smoothing"], values["data.m_per_class"]
    return -(math.log10(lr) + 2) ** 2 - (smoothing - 0.1) ** 2 + m / 10


def drive(tmp_path, name, stop_at=None, stale_after=600.0):
    """Run the trial tasks of one loss as a worker would (the objective instead of training); stop
    mid-trial `stop_at` (drawn, never told: a killed worker). Returns the drawn values by slot."""
    settings = StudySettings(out=tmp_path, trials=6, seeds=1, startup_trials=2)
    plan = recipe_plan()
    studies = LossStudies(settings, [plan], f"sqlite:///{tmp_path / name}", stale_after=stale_after)
    drawn = {}
    while (task := studies.next_task()) is not None and task.kind == "trial":
        trial = studies.start_trial(task.loss, task.index)
        drawn[task.index] = suggest(trial, DIMS)
        if task.index == stop_at:
            return drawn, studies
        studies.studies[task.loss].tell(trial, score(drawn[task.index]))
        studies.leases.finish(studies.study_name(task.loss), task.name)
    return drawn, studies


def test_a_resumed_study_draws_what_an_uninterrupted_one_draws(tmp_path):
    straight, studies = drive(tmp_path, "a.db")
    assert sorted(straight) == list(range(6))
    assert len({json.dumps(v, sort_keys=True) for v in straight.values()}) == 6
    first, _ = drive(tmp_path, "b.db", stop_at=3)
    assert sorted(first) == [0, 1, 2, 3]
    # a new worker (new sampler objects); the killed one's lease counts as stale at once
    resumed, again = drive(tmp_path, "b.db", stale_after=0.0)
    assert sorted(resumed) == [3, 4, 5]
    assert {**first, **resumed} == straight
    trials = again.studies["cross_entropy"].get_trials()
    assert sorted(t.user_attrs["unidml_slot"] for t in trials) == list(range(6))  # one Optuna trial per slot
    assert [t.number for t in trials] == list(range(6))
    assert again.best("cross_entropy").params == max(straight.values(), key=score)


def test_trial_0_trains_the_recipe_setting_where_the_space_contains_it(tmp_path):
    narrow_lr = Dimension("train.lr", 1e-3, 1e-2, log=True)  # the recipe's 0.1 lies outside: left to TPE
    plan = recipe_plan((narrow_lr, *DIMS[1:]))
    studies = LossStudies(StudySettings(out=tmp_path, trials=3, seeds=1), [plan], f"sqlite:///{tmp_path / 's.db'}")
    m_per_class = plan.config(0).data.m_per_class
    assert studies.recipe_values("cross_entropy") == {"loss.label_smoothing": 0.1, "data.m_per_class": m_per_class}
    first = suggest(studies.start_trial("cross_entropy", 0), plan.dims)
    assert (first["loss.label_smoothing"], first["data.m_per_class"]) == (0.1, m_per_class)
    assert 1e-3 <= first["train.lr"] <= 1e-2
    second = suggest(studies.start_trial("cross_entropy", 1), plan.dims)
    assert second["loss.label_smoothing"] != 0.1  # later trials are drawn


def test_a_dimension_contains_its_choices_and_its_range_on_its_step():
    assert Dimension("a.b", choices=(2, 4)).contains(4) and not Dimension("a.b", choices=(2, 4)).contains(3)
    assert not Dimension("a.b", choices=(False, True)).contains(0)  # a bool choice is not an int
    assert Dimension("a.b", 0.0, 1.0).contains(1.0) and not Dimension("a.b", 0.0, 1.0).contains(1.5)
    assert not Dimension("a.b", 0.0, 1.0).contains(True)
    assert Dimension("a.b", 1, 9, integer=True, step=2).contains(5)
    assert not Dimension("a.b", 1, 9, integer=True, step=2).contains(4)
    assert not Dimension("a.b", 1, 9, integer=True).contains(2.5)


def test_failed_and_pruned_trials_are_told_as_such(tmp_path):
    settings = StudySettings(out=tmp_path, trials=3, seeds=1)
    studies = LossStudies(settings, [recipe_plan()], f"sqlite:///{tmp_path / 's.db'}")
    study = studies.studies["cross_entropy"]
    healthy = [{"epoch": 0, "splits": {"val": {"recall@1": 90.0}}}, {"epoch": 1, "train_loss": 1.0,
                                                                      "splits": {"val": {"recall@1": 60.0}}}]
    results = [RunResult("failed", healthy, "diverged: epoch-mean training loss -1.4e4 at epoch 1"),
               RunResult("pruned", healthy), RunResult("complete", healthy)]
    for slot, result in enumerate(results):
        trial = studies.start_trial("cross_entropy", slot)
        suggest(trial, DIMS)
        if result.status == "pruned":
            trial.report(55.0, 1)
        _tell(study, trial, result, "recall@1")
    failed, pruned, complete = (studies.slot_trials("cross_entropy")[k] for k in range(3))
    assert failed.state == optuna.trial.TrialState.FAIL and "diverged" in failed.user_attrs[FAILURE]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert complete.value == 60.0  # the trained epoch, not the untrained epoch 0's 90
    assert studies.best("cross_entropy").number == complete.number


def test_the_median_rule_stops_a_trial_before_its_last_epoch_not_at_it(tmp_path):
    settings = StudySettings(out=tmp_path, trials=4, seeds=1, prune_startup_trials=2,
                             prune_warmup_share=0.0)  # the rule may stop a trial from epoch 1
    studies = LossStudies(settings, [recipe_plan()], f"sqlite:///{tmp_path / 's.db'}")
    study = studies.studies["cross_entropy"]

    def epoch(k: int, recall: float) -> dict:
        return {"epoch": k, "splits": {"val": {"recall@1": recall}}}

    for slot in range(2):  # two completed trials scoring 80 at epochs 1-3
        trial = studies.start_trial("cross_entropy", slot)
        suggest(trial, DIMS)
        assert not any(report_and_check(trial, epoch(k, 80.0), 3, "recall@1") for k in (1, 2, 3))
        study.tell(trial, 80.0)
    worse = studies.start_trial("cross_entropy", 2)
    suggest(worse, DIMS)
    assert report_and_check(worse, epoch(1, 20.0), 3, "recall@1")  # below the median at epoch 1 of 3: stop
    last = studies.start_trial("cross_entropy", 3)
    suggest(last, DIMS)
    assert not report_and_check(last, epoch(3, 20.0), 3, "recall@1")  # as low, but at its last epoch: finish
    assert last.should_prune()  # the median rule alone would have stopped it there


# ------------------------------------------------------------------ end to end (subprocesses)

TINY = ["data.synthetic.classes=12", "data.synthetic.per_class=6", "data.synthetic.size=32", "data.image_size=32",
        "data.resize_size=32", "data.num_workers=0", "data.backend=torchvision", "train.epochs=2",
        "train.batch_size=16", "train.warmup_iters=1", "eval.ks=[1,2]", "eval.batch_size=64",
        "engine.precision=fp32", "data.val_classes=0.25"]


def variants(tmp_path) -> Path:
    directory = tmp_path / "variants"
    directory.mkdir(exist_ok=True)
    (directory / "cross_entropy.yaml").write_text(
        "loss: {name: cross_entropy}\nsearch:\n  train.lr: {low: 0.01, high: 0.2, log: true}\n"
        "  loss.label_smoothing: {low: 0.0, high: 0.2}\n")
    return directory


def compare(tmp_path, out, trials, trial_epochs, env=None, wait=True):
    entry = [fault_injection.SCRIPT] if env else ["-m", "unidml"]  # a fault spec in `env` needs the test entry
    args = [sys.executable, *entry, "compare", "--config", str(QUICKSTART), "--losses", "ce",
            "--trials", str(trials), "--trial-epochs", str(trial_epochs), "--seeds", "1", "--out", str(out),
            "--variants", str(variants(tmp_path)), "--poll-seconds", "0.5",
            *[a for item in [f"data.root={tmp_path / 'data'}", *TINY] for a in ("--set", item)]]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=REPO)
    if not wait:
        return proc
    output = proc.communicate()[0]
    return proc.returncode, output


def table(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.mark.slow
def test_a_two_rank_study_runs_every_task_once_on_both_ranks(tmp_path):
    """Under torchrun (2 gloo ranks) every rank receives the same planned task and prune decisions."""
    out = tmp_path / "two_ranks"
    args = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "unidml", "compare", "--config",
            str(QUICKSTART), "--losses", "ce", "--trials", "2", "--trial-epochs", "1", "--seeds", "1", "--out",
            str(out), "--variants", str(variants(tmp_path)), "--poll-seconds", "0.5",
            *[a for item in [f"data.root={tmp_path / 'data'}", *TINY, "engine.backend=ddp"] for a in ("--set", item)]]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    starts = [line for line in done.stdout.splitlines() if " -> " in line and line.startswith("[cross_entropy ")]
    assert [line.split("]")[0] for line in starts] == ["[cross_entropy trial0", "[cross_entropy trial1",
                                                       "[cross_entropy seed0"]
    assert len(table(out / "trials.csv")) == 2 and (out / "summary.md").is_file()


@pytest.mark.slow
def test_a_killed_study_resumes_to_the_same_tables_without_retraining(tmp_path):
    code, log = compare(tmp_path, tmp_path / "straight", trials=2, trial_epochs=2)
    assert code == 0, log
    # checkpoints are written after epochs 0, 1, 2 of each run: the 5th write is trial 1's epoch 1
    code, log = compare(tmp_path, tmp_path / "killed", trials=2, trial_epochs=2,
                        env={fault_injection.CHECKPOINT_FAULT: "5:done:kill"})
    assert code == -9, log
    trial0 = tmp_path / "killed" / "cross_entropy" / "trial0" / "metrics.json"
    before = (trial0.stat().st_mtime_ns, trial0.read_text())
    code, log = compare(tmp_path, tmp_path / "killed", trials=2, trial_epochs=2)
    assert code == 0, log
    assert "[cross_entropy trial0]" not in log and "[cross_entropy trial1] trial" in log
    assert (trial0.stat().st_mtime_ns, trial0.read_text()) == before
    resumed = json.loads((tmp_path / "killed" / "cross_entropy" / "trial1" / "metrics.json").read_text())
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2]
    for name in ("summary.csv", "trials.csv", "hyperparameters.csv"):
        assert table(tmp_path / "killed" / name) == table(tmp_path / "straight" / name), name
    assert all(t["state"] == "complete" for t in table(tmp_path / "killed" / "trials.csv"))
    for png in ("tuning_curves", "recall_at_k"):
        assert (tmp_path / "killed" / f"{png}.png").stat().st_size > 0


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_without_duplicates(tmp_path):
    out = tmp_path / "shared"
    workers = [compare(tmp_path, out, trials=3, trial_epochs=1, wait=False) for _ in range(2)]
    logs = [w.communicate()[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    started = [line.split("]")[0] + "]" for text in logs for line in text.splitlines()
               if line.startswith("[cross_entropy ") and (" trial " in line or " retraining " in line)]
    assert sorted(started) == sorted(f"[cross_entropy {t}]" for t in ("trial0", "trial1", "trial2", "seed0"))
    db = sqlite3.connect(out / "study.db")
    slots = db.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'unidml_slot'").fetchall()
    states = db.execute("SELECT state FROM trials").fetchall()
    assert sorted(json.loads(v) for (v,) in slots) == [0, 1, 2] and states == [("COMPLETE",)] * 3
    for k in range(3):
        history = json.loads((out / "cross_entropy" / f"trial{k}" / "metrics.json").read_text())["epochs"]
        assert [e["epoch"] for e in history] == [0, 1] and set(history[1]["splits"]) == {"val"}
    assert len(table(out / "trials.csv")) == 3
