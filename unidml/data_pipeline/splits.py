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
    """Move round(fraction * K) training classes (at least 2, chosen by `seed`) into a `val` split.

    Two is the least a validation split can rank with: with one class every neighbour is correct and
    Recall@K is 100 at every epoch, which would select nothing. At least 2 classes stay for training.

    A dataset that has its own `val` split keeps it (nothing is carved); either way a note says which
    validation split the run uses.
    """
    if fraction <= 0:
        return dataset
    if "val" in dataset.splits:
        count = dataset.splits["val"].num_classes
        note = f"validation split: the dataset's own ({count} classes); data.val_classes unused"
        return dataclasses.replace(dataset, notes=dataset.notes + (note,))
    classes = dataset.train.classes
    count = max(2, int(round(fraction * len(classes))))
    if count > len(classes) - 2:
        raise UserError(f"data.val_classes={fraction}: {len(classes)} training classes are too few for a validation "
                        f"split (it takes 2 classes or more and leaves at least 2 to train); select on test with "
                        f"data.val_classes=0 eval.split=test")
    rng = np.random.default_rng([seed, 0x5A1])
    val_classes = rng.choice(classes, size=count, replace=False)
    in_val = np.isin(dataset.train.labels, val_classes)
    splits = dict(dataset.splits)
    splits["train"] = _subset(dataset.train, "train", ~in_val)
    splits["val"] = _subset(dataset.train, "val", in_val)
    note = (f"validation split: {count} of {len(classes)} training classes held out (data.val_classes={fraction:g}, "
            f"class-disjoint, chosen by train.seed={seed})")
    return dataclasses.replace(dataset, splits=splits, eval_pairs={**dataset.eval_pairs, "val": ("val", None)},
                               notes=dataset.notes + (note,))
