"""The two reference rows of every study report, on the same splits as the losses' runs.

*Untrained network*: the epoch-0 evaluation every retraining already runs before its first step
(randomly initialised network and embedding head). *Raw pixels*: cosine k-NN on the flattened
test-transformed images (resized and centre-cropped to `data.image_size`, normalised), through the
same `Evaluator` the runs use, on the splits each seed's config carves. A loss that ends below
either learned less than nothing; the report flags it.
"""
from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from torch import nn

from unidml.engine.distributed import DistEnv

UNTRAINED = "untrained network (epoch 0)"
RAW_PIXELS = "raw pixels (cosine k-NN)"


def raw_pixel_metrics(configs: Sequence[DictConfig], env: DistEnv) -> list[dict[str, dict[str, float]]]:
    """Per config (one per seed): split -> metrics of cosine k-NN on the test-transformed pixels."""
    from unidml.data_pipeline import build_dataset
    from unidml.engine.evaluator import Evaluator

    found = []
    for cfg in configs:
        cfg = OmegaConf.merge(cfg, {"eval": {"metric": "cosine"}})
        dataset = build_dataset(cfg.data, seed=int(cfg.train.seed))
        found.append(Evaluator(cfg, dataset, env).evaluate(nn.Flatten()))
    return found


def epoch0_entries(histories: Sequence[Sequence[dict]]) -> list[dict[str, dict[str, float]]]:
    """split -> metrics of each run's epoch-0 evaluation (runs without one are skipped)."""
    return [entry["splits"] for history in histories for entry in history if entry.get("epoch") == 0]


def as_runs(per_seed: Sequence[dict[str, dict[str, Any]]]) -> list[dict]:
    """Baseline evaluations in the shape of a loss's finished retrainings (for the report's summary rows)."""
    return [{"best": {"epoch": 0, "splits": splits}, "epochs": []} for splits in per_seed]
