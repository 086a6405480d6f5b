"""End-to-end training on a tiny synthetic dataset: outputs, learning, checkpoint reload, resume rules."""
import json
from pathlib import Path

import pytest
import torch

from unidml.engine.distributed import init_distributed
from unidml.engine.trainer import Trainer
from unidml.errors import UserError
from unidml.launcher.cli import main
from unidml.run_config import load_for_inference, load_run_config

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path) -> list[str]:
    return [f"data.root={data_root}", "data.synthetic.classes=8", "data.synthetic.per_class=8",
            "data.synthetic.size=32", "data.image_size=32", "data.resize_size=32", "data.num_workers=0",
            "data.backend=torchvision", "train.epochs=3", "train.batch_size=16", "train.lr=0.01", "train.momentum=0.5",
            "train.warmup_iters=2", "eval.ks=[1,2]", "eval.batch_size=32", "engine.precision=fp32",
            "data.val_classes=0", "eval.split=test"]  # all 4 training classes train (32 images)


def make_trainer(run_dir: Path, overrides: list[str]) -> Trainer:
    cfg = load_run_config(REPO / "configs" / "quickstart.yaml", overrides)
    return Trainer(cfg, run_dir, init_distributed("cpu"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_run_learns_writes_outputs_and_reloads(tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(run, tiny_overrides(tmp_path / "data"))
    result = trainer.fit()

    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2, 3]
    losses = [e["train_loss"] for e in metrics["epochs"][1:]]
    assert losses[-1] < losses[0], losses
    for entry in metrics["epochs"]:
        assert {"recall@1", "recall@2", "map@r", "r_precision"} <= entry.keys()
        assert 0.0 <= entry["recall@1"] <= entry["recall@2"] <= 100.0
    assert metrics["best"]["selected_by"] == "test recall@1"
    assert metrics["best"]["recall@1"] == max(e["recall@1"] for e in metrics["epochs"])
    assert result["best"]["epoch"] == metrics["best"]["epoch"]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert (run / "checkpoints" / "best.pt").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "plots" / "recall_at_k.png").stat().st_size > 0

    reloaded, cfg = load_for_inference(run / "checkpoints" / "last.pt")
    assert cfg == trainer.cfg
    trained = trainer.module.model.eval()
    for key, value in trained.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    images = torch.randn(4, 3, 32, 32)
    # On the CPU both are contiguous (runtime.memory_format): the same layout, so the same kernels.
    assert trained.backbone.conv1.weight.is_contiguous() and reloaded.backbone.conv1.weight.is_contiguous()
    with torch.no_grad():
        assert torch.equal(trained(images), reloaded(images))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_rules(tmp_path):
    overrides = tiny_overrides(tmp_path / "data") + ["train.epochs=1"]
    run = tmp_path / "run"
    make_trainer(run, overrides).fit()
    with pytest.raises(UserError, match="already holds a run"):
        make_trainer(run, overrides).fit()
    finished = make_trainer(run, overrides + ["train.resume=auto"])
    finished.fit()  # nothing left to train: resumes at the last epoch and stops
    assert finished.epoch == 1 and finished.step == 2  # 32 train images, batch 16


def test_cli_reports_bad_override_in_one_line(capsys):
    code = main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), "train.lrr=0.1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("unidml: error: override 'train.lrr=0.1': key 'train.lrr'") and "\n" not in err


def test_cli_takes_overrides_after_options(capsys):
    code = main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), "--deepspeed", "ds.json",
                 "train.lrr=0.1"])
    assert code == 2
    assert "key 'train.lrr'" in capsys.readouterr().err
