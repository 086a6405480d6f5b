"""The study report from hand-written results: exact means and sample stds, selection of trained epochs,
trial and hyperparameter tables, budget, failures, plots."""
import csv
import json
import math

import pytest

from unidml.study.report import best_so_far, mean_std, write_report
from unidml.study.results import LossResult, SeedRow, TrialRow, Usage, _seed_row
from unidml.study.runs import best_trained_entry


def history(r1_test, r1_val, best_epoch, mi=None, epochs=3):
    """Evaluations at epochs 0..epochs-1; the best_epoch one carries the given values, the others half."""
    out = []
    for epoch in range(epochs):
        scale = 1.0 if epoch == best_epoch else 0.5
        splits = {name: {"recall@1": r1 * scale, "recall@4": min(100.0, 2 * r1 * scale), "map@r": r1 * scale / 2,
                         "r_precision": r1 * scale / 3} for name, r1 in (("test", r1_test), ("val", r1_val))}
        entry = {"epoch": epoch, "step": 10 * epoch, **splits["val"], "splits": splits}
        if epoch:
            entry.update(train_loss=3.0 - epoch, tightness=-epoch, contrast=3.0)
        if mi is not None:
            entry["mi_knn"] = mi * scale
        out.append(entry)
    return out


def seed(index, r1_test, r1_val, best_epoch, mi=None):
    h = history(r1_test, r1_val, best_epoch, mi)
    return SeedRow(index, "complete", "", h, best_trained_entry(h, "val", "recall@1"), Usage(2, 640))


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_best_so_far_ignores_missing_and_non_finite_scores():
    out = best_so_far([None, 3.0, 2.0, float("nan"), 5.0, None])
    assert math.isnan(out[0]) and out[1:] == [3.0, 3.0, 3.0, 5.0, 5.0]


def test_the_untrained_epoch_is_never_selected():
    h = history(60.0, 90.0, best_epoch=0)  # epoch 0 scores best on val, but it is the untrained network
    assert best_trained_entry(h, "val", "recall@1")["epoch"] == 1  # first of the tied trained epochs


def test_report_tables_trials_budget_failures_and_plots(tmp_path):
    ce = LossResult("cross_entropy", "label_smoothing=0.1 (random sampler)", ["train.lr [0.01, 0.1] log"],
                    trials=[TrialRow(0, "complete", 70.0, {"train.lr": 0.05}, "", Usage(2, 640)),
                            TrialRow(1, "pruned", 40.0, {"train.lr": 0.011}, "", Usage(1, 320)),
                            TrialRow(2, "failed", None, {"train.lr": 0.09}, "diverged: loss 1e4", Usage(1, 320))],
                    seeds=[seed(0, 60.0, 70.0, 2, mi=1.0), seed(1, 64.0, 74.0, 1, mi=2.0)])
    ce.chosen = ce.trials[0]
    triplet = LossResult("triplet", "margin=0.2 (m_per_class m=4 sampler)", ["loss.margin [0.05, 0.5] linear"],
                         trials=[TrialRow(0, "complete", 50.0, {"loss.margin": 0.1}, "", Usage(2, 640))],
                         seeds=[seed(0, 50.0, 55.0, 2),
                                SeedRow(1, "failed", "stopped by the engine at epoch 1: non-finite", [], None,
                                        Usage(1, 320))])
    triplet.chosen = triplet.trials[0]
    paths = write_report(tmp_path / "out", [ce, triplet], {"config": "c.yaml", "training": "2 epochs"},
                         "Every loss gets the same tuning budget.", "recall@1")

    rows = {row["loss"]: row for row in csv.DictReader(paths["csv"].open())}
    ce_row, tr_row = rows["cross_entropy"], rows["triplet"]
    assert (ce_row["seeds"], tr_row["seeds"]) == ("2", "1")  # the failed retraining is left out
    assert float(ce_row["test recall@1 mean"]) == pytest.approx(62.0)
    assert float(ce_row["test recall@1 std"]) == pytest.approx(math.sqrt(8.0), abs=1e-4)
    assert float(ce_row["val map@r mean"]) == pytest.approx(36.0)
    assert float(ce_row["epoch mean"]) == pytest.approx(1.5)
    assert float(ce_row["mi_knn mean"]) == pytest.approx(1.5)
    assert float(tr_row["test r_precision mean"]) == pytest.approx(50.0 / 3, abs=1e-4)
    assert float(tr_row["test r_precision std"]) == 0.0 and tr_row["mi_knn mean"] == ""

    trials = list(csv.DictReader(paths["trials"].open()))
    assert [(t["loss"], t["trial"], t["state"], t["val recall@1"]) for t in trials] == [
        ("cross_entropy", "0", "complete", "70.0000"), ("cross_entropy", "1", "pruned", "40.0000"),
        ("cross_entropy", "2", "failed", ""), ("triplet", "0", "complete", "50.0000")]
    assert trials[2]["failure"] == "diverged: loss 1e4" and trials[1]["train.lr"] == "0.011"
    chosen = list(csv.DictReader(paths["hyperparameters"].open()))
    assert [(c["loss"], c["trial"], c["key"], c["value"]) for c in chosen] == [
        ("cross_entropy", "0", "train.lr", "0.05"), ("triplet", "0", "loss.margin", "0.1")]

    page = paths["markdown"].read_text()
    assert "| cross_entropy | 2 | 1.5 ± 0.7 | 62.00 ± 2.83 | 100.00 ± 0.00 | 31.00 ± 1.41 | 20.67 ± 0.94 |" in page
    assert page.index("## test") < page.index("## val") < page.index("## Budget")
    # budget: trials by state, epochs and images of tuning and of retraining
    assert "| cross_entropy | 3 | 1 | 1 | 1 | 4 | 1,280 | 4 | 1,280 | 0 |" in page
    assert "| triplet | 1 | 1 | 0 | 0 | 2 | 640 | 3 | 960 | 1 |" in page
    assert "| cross_entropy | 0 | 70.00 | `train.lr`=0.05 |" in page
    assert "| 1 | pruned | 40.00 (at stop) | 1 | train.lr=0.011 |" in page
    assert "- cross_entropy trial 2: diverged: loss 1e4" in page
    assert "- triplet seed 1: failed: stopped by the engine at epoch 1: non-finite" in page
    assert "Every loss gets the same tuning budget." in page
    for name in ("recall_at_k", "training_curves", "terms", "information", "tuning"):
        assert paths[name].stat().st_size > 0 and f"({paths[name].name})" in page


def _write_run(run_dir, h, epochs, stopped=None, outcome=None):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"epochs": h, "stopped": stopped}))
    (run_dir / "config.yaml").write_text(f"train: {{epochs: {epochs}, batch_size: 32, grad_accum: 2}}\n")
    if outcome:
        (run_dir / "study_outcome.json").write_text(json.dumps(outcome))


def test_a_diverged_retraining_is_failed_and_never_reported(tmp_path):
    healthy = history(60.0, 70.0, 2)
    _write_run(tmp_path / "ok", healthy, 2, outcome={"status": "complete"})
    row = _seed_row(tmp_path / "ok", 0, "recall@1", "val")
    assert (row.status, row.selected["epoch"], row.usage) == ("complete", 2, Usage(2, 20 * 32 * 2))
    diverged = history(60.0, 90.0, 0)  # the untrained epoch would win on val
    diverged[2]["train_loss"] = -14426.0
    _write_run(tmp_path / "pce", diverged, 2, outcome={"status": "complete"})
    row = _seed_row(tmp_path / "pce", 0, "recall@1", "val")
    assert row.status == "failed" and row.selected is None and "diverged" in row.reason
    _write_run(tmp_path / "nan", healthy, 2, stopped={"reason": "non_finite", "epoch": 1, "message": "non-finite loss"})
    assert _seed_row(tmp_path / "nan", 0, "recall@1", "val").status == "failed"
    _write_run(tmp_path / "half", healthy[:2], 2)
    assert _seed_row(tmp_path / "half", 0, "recall@1", "val").status == "missing"
