"""The second built-in generated dataset (`glyphs`): deterministic bytes, fine-grained classes that share
a root, selectable as `data.dataset: glyphs`, and kept apart from the `synthetic` generator's trees."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from unidml.config.schema import DataConfig
from unidml.data_pipeline import build_dataset
from unidml.data_pipeline.glyphs import MIN_MOVE, STROKES, class_specs
from unidml.data_pipeline.synthetic import generate_dataset
from unidml.errors import UserError

GLYPHS = "unidml.data_pipeline.glyphs"
SMALL = dict(classes=6, per_class=3, size=24, seed=5, test_fraction=0.5)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_parameters_give_the_same_bytes_whatever_the_workers(tmp_path):
    one = generate_dataset(tmp_path / "a", **SMALL, workers=1, generator=GLYPHS)
    two = generate_dataset(tmp_path / "b", **SMALL, workers=2, generator=GLYPHS)
    assert digest(one) == digest(two) and len([k for k in digest(one) if k.endswith(".jpg")]) == 18
    other = generate_dataset(tmp_path / "c", **{**SMALL, "seed": 6}, workers=1, generator=GLYPHS)
    assert digest(other)["images/c0001/000001.jpg"] != digest(one)["images/c0001/000001.jpg"]
    with Image.open(one / "images/c0001/000001.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (24, 24))
    a, b = (np.asarray(Image.open(one / f"images/c0001/00000{i}.jpg"), np.float32) for i in (1, 2))
    assert np.abs(a - b).mean() > 10  # instances of a class differ (pose, colour, background)


def test_classes_are_distinct_glyphs_descending_from_roots():
    specs = class_specs(60, 0)
    assert len({s.strokes for s in specs}) == 60 and all(len(s.strokes) == STROKES for s in specs)
    assert len({s.super_class for s in specs}) == 12  # one root per five classes
    assert class_specs(60, 0) == specs and class_specs(60, 1) != specs
    for root in {s.root for s in specs}:  # a child differs from its family in at least one stroke by MIN_MOVE
        family = [np.array(s.strokes) for s in specs if s.root == root]
        for i, a in enumerate(family):
            for b in family[i + 1:]:
                assert np.abs(a - b).max() >= MIN_MOVE - 1e-9


def test_selectable_as_a_dataset_and_never_mixed_with_synthetic(tmp_path):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"dataset": "glyphs", "root": str(tmp_path / "g"),
                                                             "val_classes": 0.0, "synthetic": SMALL})
    dataset = build_dataset(cfg)
    assert len(dataset.splits["train"]) == 9 and len(dataset.splits["test"]) == 9
    generate_dataset(tmp_path / "s", **SMALL, workers=1)
    with pytest.raises(UserError, match="holds files but no glyphs dataset") as info:
        build_dataset(OmegaConf.merge(cfg, {"root": str(tmp_path / "s")}))
    assert "\n" not in str(info.value)
