"""Class-disjoint validation split carved from the training classes (`data.val_classes`)."""
from __future__ import annotations

import dataclasses

import numpy as np

from unidml.data_pipeline.dataset import DatasetDescription, ImageSet
from unidml.errors import UserError


def _subset(images: ImageSet, name: str, keep: np.ndarray) -> ImageSet:
    rows = np.flatnonzero(keep)
    return ImageSet(name, tuple(images.paths[i] for i in rows), images.labels[rows])


def carve_validation(dataset: DatasetDescription, fraction: float, seed: int) -> DatasetDescription:
    """Move round(fraction * K) training classes (at least 1, chosen by `seed`) into a `val` split."""
    if fraction <= 0:
        return dataset
    classes = dataset.train.classes
    count = max(1, int(round(fraction * len(classes))))
    if count >= len(classes):
        raise UserError(f"data.val_classes={fraction}: would leave no training class "
                        f"({len(classes)} training classes)")
    rng = np.random.default_rng([seed, 0x5A1])
    val_classes = rng.choice(classes, size=count, replace=False)
    in_val = np.isin(dataset.train.labels, val_classes)
    splits = dict(dataset.splits)
    splits["train"] = _subset(dataset.train, "train", ~in_val)
    splits["val"] = _subset(dataset.train, "val", in_val)
    return dataclasses.replace(dataset, splits=splits, eval_pairs={**dataset.eval_pairs, "val": ("val", None)})
