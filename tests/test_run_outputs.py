"""What a user looks at after a run: its plots (both splits, the training loss) and the closing summary table."""
from __future__ import annotations

import json
from pathlib import Path

from unidml.engine.run_plots import plot_recall, plot_train_loss
from unidml.launcher.summary import format_table, run_summary, study_summary

REPO = Path(__file__).resolve().parents[1]


def _entry(epoch: int, val: float, test: float, loss: float | None = None) -> dict:
    splits = {"val": {"recall@1": val, "recall@2": val + 5, "map@r": val / 4, "num_queries": 40},
              "test": {"recall@1": test, "recall@2": test + 5, "map@r": test / 4, "num_queries": 48}}
    return {"epoch": epoch, **({"train_loss": loss} if loss is not None else {}), **splits["val"], "splits": splits}


HISTORY = [_entry(0, 20.0, 25.0), _entry(1, 40.0, 38.0, 3.2), _entry(2, 35.0, 45.0, 2.9)]


def _written(paths: list[Path]):
    def write(draw, path: Path) -> None:
        draw(path)
        paths.append(path)
    return write


def test_the_recall_plot_shows_the_test_split_as_reported_beside_the_selecting_one(tmp_path):
    written: list[Path] = []
    fig = plot_recall(HISTORY, "val", 1, tmp_path / "recall.png", _written(written))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["val R@1 (selects the epoch)"].get_ydata()) == [20.0, 40.0, 35.0]
    test = lines["test R@1 (reported, not used to select)"]
    assert list(test.get_ydata()) == [25.0, 38.0, 45.0] and test.get_linestyle() == "--"
    assert list(lines["test R@2"].get_ydata()) == [30.0, 43.0, 50.0]
    assert list(lines["selected epoch 1"].get_xdata()) == [1, 1]
    assert written == [tmp_path / "recall.png"] and (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_selecting_on_test_draws_one_split():
    fig = plot_recall(HISTORY, "test", 2, Path("unused.png"), lambda draw, path: None)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["test R@1 (selects the epoch)", "test R@2", "selected epoch 2"]


def test_the_training_loss_plot_starts_after_training_began(tmp_path):
    fig = plot_train_loss(HISTORY, tmp_path / "loss.png", _written([]))
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [3.2, 2.9]
    assert plot_train_loss(HISTORY[:1], tmp_path / "none.png", _written([])) is None


def test_the_run_summary_lists_the_selected_epoch_on_every_split():
    metrics = {"best": {**HISTORY[1], "selected_by": "val recall@1"}, "throughput": {"images_per_s": 151.25}}
    assert run_summary(metrics, 12.4) == (
        "split  role                      R@1  MAP@R  queries\n"
        "-----  ----------------------  -----  -----  -------\n"
        "val    selects the epoch       40.00  10.00       40\n"
        "test   reported at that epoch  38.00   9.50       48\n"
        "best epoch 1 | wall time 12 s | 151.2 images/s (training, last epoch)")


def test_the_study_summary_gives_mean_and_std_per_loss():
    rows = [{"loss": "cross_entropy", "seeds": 2, "epoch": (3.0, 1.0), "test recall@1": (66.0, 1.5),
             "test map@r": (20.25, 0.5)},
            {"loss": "untrained network", "seeds": 4, "epoch": (0.0, 0.0), "test recall@1": (25.3, 0.0)}]
    assert study_summary(rows, "test", 61.0, {"cross_entropy": 151.25}).splitlines() == [
        "loss               seeds  epoch        test R@1      test MAP@R    images/s",
        "-----------------  -----  -----------  ------------  ------------  --------",
        "cross_entropy          2  3.00 ± 1.00  66.00 ± 1.50  20.25 ± 0.50  151.2",
        "untrained network      4  0.00 ± 0.00  25.30 ± 0.00",
        "wall time 61 s"]


def test_format_table_right_aligns_numbers_only():
    assert format_table(["a", "n"], [["x", 1], ["long", 10]]) == "a      n\n----  --\nx      1\nlong  10"


def test_train_prints_the_summary_and_draws_both_plots(tmp_path, capsys):
    from unidml.launcher import cli

    root = tmp_path
    overrides = [f"data.root={root / 'data'}", "data.synthetic.classes=8", "data.synthetic.per_class=8",
                 "data.synthetic.size=32", "data.image_size=32", "data.resize_size=32", "data.num_workers=0",
                 "data.backend=torchvision", "train.batch_size=16", "train.warmup_iters=2", "train.epochs=1",
                 "eval.ks=[1,2]", "eval.batch_size=32", "engine.precision=fp32"]
    assert cli.main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), "--out", str(root / "run"),
                     *overrides]) == 0
    out = capsys.readouterr().out.splitlines()
    best = json.loads((root / "run" / "metrics.json").read_text())["best"]
    header = next(i for i, line in enumerate(out) if line.startswith("split  role"))
    assert out[header + 2].split()[:4] == ["val", "selects", "the", "epoch"]
    assert float(out[header + 2].split()[-3]) == round(best["splits"]["val"]["recall@1"], 2)
    assert out[header + 3].startswith("test   reported at that epoch")
    assert out[-1].startswith("done: ")
    assert {p.name for p in (root / "run" / "plots").glob("*.png")} == {"recall_at_k.png", "train_loss.png"}
