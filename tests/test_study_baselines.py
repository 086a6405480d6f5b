"""The report's references: raw-pixel k-NN through the product's evaluation against a numpy oracle, the
untrained and raw-pixel rows with their flags, and the seed statistics against closed forms."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from unidml.data_pipeline import build_dataset
from unidml.engine.distributed import DistEnv
from unidml.run_config import load_run_config
from unidml.study.baselines import RAW_PIXELS, UNTRAINED, as_runs, epoch0_entries, raw_pixel_metrics
from unidml.study.report import write_report
from unidml.study.results import LossResult, SeedRow, Usage
from unidml.study.stats import confidence_interval, indistinguishable, welch_p

CONFIG = """
data: {dataset: glyphs, root: ROOT, val_classes: 0.0, image_size: 32, resize_size: 32, backend: torchvision,
       num_workers: 0, synthetic: {classes: 8, per_class: 4, size: 32, seed: 2, test_fraction: 0.5}}
model: {arch: resnet18, pretrained: ""}
eval: {split: test, ks: [1], metric: euclidean}
engine: {precision: fp32}
"""


def test_raw_pixels_match_a_numpy_cosine_knn(tmp_path):
    cfg = load_run_config(text=CONFIG.replace("ROOT", str(tmp_path / "g")), source="test.yaml")
    found = raw_pixel_metrics([cfg], DistEnv(0, 1, 0, torch.device("cpu")))[0]["test"]
    test = build_dataset(cfg.data).splits["test"]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pixels = np.stack([((np.asarray(Image.open(p).convert("RGB"), np.float64) / 255 - mean) / std).transpose(2, 0, 1)
                       .ravel() for p in test.paths])
    unit = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    labels = np.asarray(test.labels)
    expected = 100.0 * np.mean(labels[similarity.argmax(1)] == labels)
    assert found["recall@1"] == expected  # counts of 16 queries: a float32 vs float64 tie would be visible
    assert found["num_queries"] == 16


def _history(epoch0: float, selected: float) -> list[dict]:
    return [{"epoch": e, "splits": {"test": {"recall@1": v, "map@r": v / 2}}} for e, v in ((0, epoch0), (3, selected))]


def _result(loss: str, scores: list[tuple[float, float]]) -> LossResult:
    seeds = [SeedRow(s, "complete", "", _history(a, b), _history(a, b)[1], Usage(3, 30)) for s, (a, b) in
             enumerate(scores)]
    return LossResult(loss, "", [], seeds=seeds)


def test_the_report_has_both_references_and_flags_a_loss_below_one(tmp_path):
    results = [_result("good", [(20.0, 60.0), (22.0, 62.0)]), _result("bad", [(21.0, 28.0), (23.0, 26.0)])]
    histories = [s.history for r in results for s in r.finished_seeds]
    assert [e["test"]["recall@1"] for e in epoch0_entries(histories)] == [20.0, 22.0, 21.0, 23.0]
    baselines = {UNTRAINED: as_runs(epoch0_entries(histories)), RAW_PIXELS: as_runs([{"test": {"recall@1": 30.0,
                                                                                             "map@r": 15.0}}])}
    paths = write_report(tmp_path, results, {"config": "c.yaml"}, "protocol", baselines=baselines)
    page = paths["markdown"].read_text()
    assert f"| *{UNTRAINED}* | 4 | | 21.50 ± 1.29 |" in page
    assert f"| *{RAW_PIXELS}* | 1 | | 30.00 ± 0.00 |" in page
    assert f"**Below a reference on test**: `bad` (below {RAW_PIXELS})." in page  # 27 > 21.5, < 30
    low, high = confidence_interval([60.0, 62.0])
    assert f"| good | 2 | 3.0 ± 0.0 | 61.00 ± 1.41 | 30.50 ± 0.71 | [{low:.2f}, {high:.2f}] |  |" in page
    assert "Not distinguishable on test R@1 (Welch's t-test, p >= 0.05): no pair." in page
    csv = (tmp_path / "summary.csv").read_text()
    assert UNTRAINED in csv and RAW_PIXELS in csv


def test_interval_and_welch_test_match_closed_forms():
    low, high = confidence_interval([1.0, 2.0, 3.0])
    assert math.isclose(high - 2.0, 4.302652729911275 / math.sqrt(3), rel_tol=1e-9) and math.isclose(low + high, 4.0)
    assert all(math.isnan(v) for v in confidence_interval([5.0]))
    # equal sizes and variances: Welch's df is 4, whose t CDF has the closed form below
    t = -3.0 / math.sqrt(2.0 / 3.0)
    x = abs(t) / math.sqrt(4.0 + t * t)
    cdf = 0.5 + 0.75 * x * (1 - x * x / 3)  # Student t with 4 degrees of freedom
    assert math.isclose(welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), 2 * (1 - cdf), rel_tol=1e-9)
    scores = {"a": [60.0, 64.0, 62.0], "b": [61.0, 65.0, 60.0], "c": [80.0, 81.0, 82.0]}
    assert [(a, b) for a, b, _ in indistinguishable(scores)] == [("a", "b")]
