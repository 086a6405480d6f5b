"""Training on one's own data as the README says: a CSV of absolute paths and a train/+test/ class-folder
tree, each trained with the shipped recipe (configs/list.yaml, configs/folder.yaml) for one epoch on
tiny generated images, and reported by `unidml data check`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from test_data_fixtures import write_jpeg

from unidml.launcher.cli import main

REPO = Path(__file__).resolve().parents[1]
# The recipes' data layout and protocol as shipped; only the cost is cut (a small backbone, 32 px, 1 epoch).
TINY = ["model.arch=resnet18", "model.pretrained=", "data.image_size=32", "data.resize_size=32",
        "data.num_workers=0", "data.backend=torchvision", "train.epochs=1", "train.batch_size=8",
        "train.warmup_iters=1", "eval.ks=[1,2]", "eval.batch_size=32", "engine.precision=fp32", "engine.device=cpu"]
CLASSES, PER_CLASS = 10, 4


def _images(folder: Path, classes: range) -> list[tuple[Path, str]]:
    """PER_CLASS small JPEGs per class in folder/<class>/; (path, class name) pairs."""
    return [(write_jpeg(folder / f"class{c:02d}" / f"{k}.jpg", c, k, size=(16, 16)), f"class{c:02d}")
            for c in classes for k in range(PER_CLASS)]


def _check(capsys, *args: str) -> tuple[int, dict]:
    code = main(["data", "check", *args, "--json", "--workers", "1"])
    return code, json.loads(capsys.readouterr().out)


def _train(recipe: str, out: Path, *overrides: str) -> dict:
    assert main(["train", "--config", str(REPO / "configs" / recipe), "--out", str(out), *overrides, *TINY]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_csv_of_absolute_paths_trains_with_the_list_recipe(tmp_path, capsys, caplog, monkeypatch):
    rows = _images(tmp_path / "photos", range(CLASSES))
    csv = tmp_path / "lists" / "mine.csv"
    csv.parent.mkdir()
    csv.write_text("path,label\n" + "".join(f"{path},{name}\n" for path, name in rows))

    code, report = _check(capsys, "--dataset", "list", "--list-file", str(csv))
    assert code == 0 and report["usable"] and report["problems"] == []
    assert {k: (v["images"], v["classes"]) for k, v in report["splits"].items()} == {"train": (20, 5), "test": (20, 5)}
    assert len(report["notes"]) == 1 and "no test split given" in report["notes"][0]

    # A given root that the absolute paths lie outside of refuses them (one line naming file and line).
    assert main(["train", "--config", str(REPO / "configs" / "list.yaml"), "--out", str(tmp_path / "refused"),
                 f"data.list_file={csv}", f"data.root={tmp_path / 'lists'}", *TINY]) == 2
    assert f"{csv}:2: path '{rows[0][0]}' escapes the dataset root" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path / "lists")
    caplog.set_level(logging.INFO, logger="unidml")
    metrics = _train("list.yaml", tmp_path / "run", "data.list_file=mine.csv")  # relative to the working dir
    derived = [r.getMessage() for r in caplog.records if "no test split given" in r.getMessage()]
    assert len(derived) == 1 and "\n" not in derived[0]
    assert set(metrics["epochs"][-1]["splits"]) == {"val", "test"}  # 2 of 5 training classes held out
    assert "validation split" in metrics["protocol"] and metrics["best"]["selected_by"] == "val recall@1"
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert stored["root"] == "" and stored["list_file"] == str(csv)  # absolute: valid from any directory


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_and_test_class_folders_train_with_the_folder_recipe(tmp_path, capsys, monkeypatch):
    _images(tmp_path / "shop" / "train", range(6))
    _images(tmp_path / "shop" / "test", range(6, CLASSES))

    code, report = _check(capsys, "--dataset", "folder", "--root", str(tmp_path / "shop"))
    assert code == 0 and report["usable"] and report["notes"] == []
    assert {k: (v["images"], v["classes"]) for k, v in report["splits"].items()} == {"train": (24, 6), "test": (16, 4)}

    monkeypatch.chdir(tmp_path)
    metrics = _train("folder.yaml", tmp_path / "run", "data.root=shop")
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert stored["root"] == str(tmp_path / "shop")
    test = metrics["epochs"][-1]["splits"]["test"]
    assert test["num_queries"] == 16 and 0.0 <= test["recall@1"] <= test["recall@2"] <= 100.0

    # Evaluating the checkpoint from another directory finds the same data (the stored root is absolute).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = elsewhere / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.pt"), "--split", "test",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["num_queries"] == 16
    assert list(elsewhere.iterdir()) == [out]  # nothing generated here
