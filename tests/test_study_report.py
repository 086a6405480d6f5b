"""The study report from hand-written metrics.json files: exact means and sample stds, tables, plots."""
import csv
import json
import math

import pytest

from unidml.launcher.report import mean_std, write_report


def write_run(run_dir, r1_test, r1_val, best_epoch, mi=None):
    """A run evaluated at epochs 0..2 whose best (selected on val) entry carries the given values."""
    epochs = []
    for epoch in range(3):
        scale = 1.0 if epoch == best_epoch else 0.5
        splits = {"test": {"recall@1": r1_test * scale, "recall@4": min(100.0, 2 * r1_test * scale),
                           "map@r": r1_test * scale / 2, "r_precision": r1_test * scale / 3},
                  "val": {"recall@1": r1_val * scale, "recall@4": min(100.0, 2 * r1_val * scale),
                          "map@r": r1_val * scale / 2, "r_precision": r1_val * scale / 3}}
        entry = {"epoch": epoch, "step": 10 * epoch, **splits["val"], "splits": splits}
        if epoch:
            entry.update(train_loss=3.0 - epoch, tightness=-epoch, contrast=3.0)
        if mi is not None:
            entry["mi_knn"] = mi * scale
        epochs.append(entry)
    best = {**epochs[best_epoch], "selected_by": "val recall@1"}
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"epochs": epochs, "best": best, "protocol": "val"}))
    return run_dir


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_report_tables_and_plots(tmp_path):
    runs = {"cross_entropy": [write_run(tmp_path / "ce" / "seed0", 60.0, 70.0, 2, mi=1.0),
                              write_run(tmp_path / "ce" / "seed1", 64.0, 74.0, 1, mi=2.0)],
            "triplet": [write_run(tmp_path / "tr" / "seed0", 50.0, 55.0, 2),
                        tmp_path / "tr" / "seed1"]}  # never ran: left out of the mean
    header = {"config": "c.yaml", "budget": "2 epochs", "losses": {"cross_entropy": "{}", "triplet": "{}"}}
    paths = write_report(tmp_path / "out", runs, header, failures=["triplet seed 1: failed: boom"])

    rows = {row["loss"]: row for row in csv.DictReader(paths["csv"].open())}
    ce, tr = rows["cross_entropy"], rows["triplet"]
    assert (ce["seeds"], tr["seeds"]) == ("2", "1")
    assert float(ce["test recall@1 mean"]) == pytest.approx(62.0)
    assert float(ce["test recall@1 std"]) == pytest.approx(math.sqrt(8.0), abs=1e-4)
    assert float(ce["val map@r mean"]) == pytest.approx(36.0)
    assert float(ce["epoch mean"]) == pytest.approx(1.5)
    assert float(ce["mi_knn mean"]) == pytest.approx(1.5)
    assert float(tr["test r_precision mean"]) == pytest.approx(50.0 / 3, abs=1e-4)
    assert float(tr["test r_precision std"]) == 0.0 and tr["mi_knn mean"] == ""

    page = paths["markdown"].read_text()
    assert "| cross_entropy | 2 | 1.5 ± 0.7 | 62.00 ± 2.83 | 100.00 ± 0.00 | 31.00 ± 1.41 | 20.67 ± 0.94 |" in page
    assert page.index("## test") < page.index("## val")
    assert "triplet seed 1: failed: boom" in page
    for name in ("recall_at_k", "training_curves", "terms", "information"):
        assert paths[name].stat().st_size > 0 and f"({paths[name].name})" in page
