"""Experiment trackers (`log.trackers`) with the real packages: MLflow's file store read back with
`MlflowClient`, W&B offline files, one MLflow run from a 2-rank gloo run, the one-line error for a missing
package, and a study whose trials and retrainings are child runs of its parent run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unidml.engine.distributed import init_distributed
from unidml.engine.trainer import Trainer
from unidml.errors import UserError
from unidml.run_config import load_run_config

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yaml"


def tiny(root: Path) -> list[str]:
    """Two epochs of a 32 px resnet18 on 8 synthetic classes (a few seconds)."""
    return [f"data.root={root / 'data'}", "data.synthetic.classes=8", "data.synthetic.per_class=8",
            "data.synthetic.size=32", "data.image_size=32", "data.resize_size=32", "data.num_workers=0",
            "data.backend=torchvision", "train.batch_size=16", "train.warmup_iters=2", "train.epochs=2",
            "train.log_every=1", "eval.ks=[1,2]", "eval.batch_size=32", "engine.precision=fp32"]


def store(root: Path) -> str:
    return f"log.mlflow.tracking_uri=file:{root / 'mlruns'}"


def client(root: Path) -> MlflowClient:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return MlflowClient(tracking_uri=(root / "mlruns").as_uri())


def runs(root: Path) -> list:
    mlflow = client(root)
    experiment = mlflow.get_experiment_by_name("unidml")
    return mlflow.search_runs([experiment.experiment_id]) if experiment else []


def train(root: Path, *overrides: str) -> Path:
    cfg = load_run_config(CONFIG, [*tiny(root), *overrides])
    Trainer(cfg, root / "run", init_distributed("cpu")).fit()
    return root / "run"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_mlflow_receives_config_scalars_epochs_best_and_files_and_a_resume_continues_it(tmp_path):
    run_dir = train(tmp_path, "log.trackers=[tensorboard,mlflow]", store(tmp_path))
    (run_id,) = [r.info.run_id for r in runs(tmp_path)]
    assert json.loads((run_dir / "trackers.json").read_text()) == {"mlflow": run_id}
    mlflow = client(tmp_path)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["train.batch_size"] == "16" and params["loss.name"] == "cross_entropy"
    assert params["engine.precision"] == "fp32" and params["log.trackers"] == "['tensorboard', 'mlflow']"
    assert [m.step for m in mlflow.get_metric_history(run_id, "train/loss")] == [1, 2]  # 1 step per epoch
    assert [m.step for m in mlflow.get_metric_history(run_id, "eval_val/recall_at_1")] == [0, 1, 2]
    assert [m.step for m in mlflow.get_metric_history(run_id, "eval_test/map_at_r")] == [0, 1, 2]
    assert "diagnostics/mi_knn" in run.data.metrics
    best = json.loads((run_dir / "metrics.json").read_text())["best"]
    assert run.data.metrics["best/epoch"] == best["epoch"]
    assert run.data.metrics["best/test/recall_at_1"] == best["splits"]["test"]["recall@1"]
    assert run.data.tags["best/checkpoint"] == str((run_dir / "checkpoints" / "best.pt").resolve())
    assert {a.path for a in mlflow.list_artifacts(run_id)} >= {"metrics.json", "config.yaml", "train.log", "plots"}
    assert [a.path for a in mlflow.list_artifacts(run_id, "plots")] == ["plots/recall_at_k.png", "plots/train_loss.png"]
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())  # TensorBoard too

    train(tmp_path, "log.trackers=[tensorboard,mlflow]", store(tmp_path), "train.resume=auto", "train.epochs=3")
    assert [r.info.run_id for r in runs(tmp_path)] == [run_id]  # the same run, continued
    assert [m.step for m in client(tmp_path).get_metric_history(run_id, "eval_val/recall_at_1")] == [0, 1, 2, 3]


@pytest.mark.timeout(120)
def test_wandb_without_an_api_key_writes_an_offline_run_into_the_run_dir(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    run_dir = train(tmp_path, "log.trackers=[wandb]")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
    assert json.loads((offline / "files" / "metrics.json").read_text()) == json.loads(
        (run_dir / "metrics.json").read_text())
    assert (offline / "files" / "plots" / "recall_at_k.png").is_file()
    assert not (run_dir / "tb").exists()  # TensorBoard only when listed


def test_unknown_or_repeated_tracker_is_refused_at_load(tmp_path):
    with pytest.raises(UserError, match=r"key 'log.trackers': unknown \['neptune'\]"):
        load_run_config(CONFIG, ["log.trackers=[tensorboard,neptune]"])
    with pytest.raises(UserError, match="key 'log.trackers': names one twice"):
        load_run_config(CONFIG, ["log.trackers=[mlflow,mlflow]"])
    assert list(load_run_config(CONFIG).log.trackers) == ["tensorboard"]


@pytest.mark.parametrize("module, package", [("mlflow", "mlflow-skinny"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_before_training(tmp_path, module, package):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from unidml.launcher.cli import main\nsys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "train", "--config", str(CONFIG), "--out", str(tmp_path / "run"),
                           *tiny(tmp_path), f"log.trackers=[tensorboard,{module}]"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"unidml: error: log.trackers: {module}: the {'MLflow' if module == 'mlflow' else 'W&B'} tracker needs "
        f"{package}, which is not installed (pip install 'unidml[{module}]')")
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_two_rank_gloo_run_logs_once(tmp_path):
    from test_dist_runs import child_env

    command = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "unidml", "train", "--config", str(CONFIG),
               "--out", str(tmp_path / "ddp"), *tiny(tmp_path), "engine.backend=ddp", "log.trackers=[mlflow]",
               store(tmp_path)]
    done = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (run,) = runs(tmp_path)
    assert [m.step for m in client(tmp_path).get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert [m.step for m in client(tmp_path).get_metric_history(run.info.run_id, "eval_val/recall_at_1")] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_study_logs_each_trial_and_retraining_as_a_child_of_its_parent_run(tmp_path):
    pytest.importorskip("optuna")
    from test_study_tuning import variants

    from unidml.launcher.cli import main

    out = tmp_path / "study"
    sets = [*tiny(tmp_path), "train.epochs=1", "log.trackers=[mlflow]", store(tmp_path)]
    args = ["compare", "--config", str(CONFIG), "--losses", "ce", "--trials", "1", "--seeds", "1", "--out", str(out),
            "--variants", str(variants(tmp_path)), *[a for item in sets for a in ("--set", item)]]
    assert main(args) == 0
    found = {r.info.run_name: r for r in runs(tmp_path)}
    assert set(found) == {"study:compare", "cross_entropy/trial0", "cross_entropy/seed0"}
    parent = found["study:compare"]
    assert parent.info.status == "FINISHED"
    assert "summary.md" in {a.path for a in client(tmp_path).list_artifacts(parent.info.run_id)}
    for name, kind in (("cross_entropy/trial0", "trial"), ("cross_entropy/seed0", "seed")):
        tags = found[name].data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["unidml.kind"] == kind
        assert tags["unidml.group"] == "study:compare" and found[name].info.status == "FINISHED"
    assert "eval_test/recall_at_1" not in found["cross_entropy/trial0"].data.metrics  # a trial never sees test
    assert "eval_test/recall_at_1" in found["cross_entropy/seed0"].data.metrics


def test_a_run_ends_finished_failed_or_killed():
    from unidml.engine.trackers import status_of
    from unidml.study.runs import Pruned

    assert status_of(None) == "finished" and status_of(UserError("diverged")) == "failed"
    assert status_of(Pruned("epoch 1")) == status_of(KeyboardInterrupt()) == "killed"  # a pruned trial is no failure
