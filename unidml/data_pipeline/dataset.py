"""The one description every reader produces: image paths, labels and split membership."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """One split of a dataset: absolute image paths and their labels (the dataset's class ids as
    docs/design.md, "Datasets", defines them; use `contiguous_labels` where 0..num_classes-1 is needed)."""

    name: str
    paths: tuple[str, ...]
    labels: np.ndarray  # int64, shape (len(paths),)

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"split '{self.name}': {len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> np.ndarray:
        """Sorted distinct labels of this split."""
        return np.unique(self.labels)

    @property
    def num_classes(self) -> int:
        return int(len(self.classes))

    def contiguous_labels(self) -> np.ndarray:
        """Labels renumbered 0..num_classes-1 in sorted class order (what a classifier trains on)."""
        return np.searchsorted(self.classes, self.labels).astype(np.int64)


@dataclass(frozen=True)
class DatasetDescription:
    """A dataset as the engine sees it.

    `splits` maps split names to image sets: always `train`; `test` for self-retrieval datasets;
    `query` and `gallery` for In-Shop; `val` when a class-disjoint validation split was carved.
    `eval_pairs` lists what evaluation compares: (query split, gallery split or None for
    self-retrieval), e.g. `{"test": ("test", None)}` or `{"test": ("query", "gallery")}`.
    `notes` are one-line announcements of what the reader derived (e.g. a split the data did not have).
    """

    name: str
    root: Path
    splits: dict[str, ImageSet]
    eval_pairs: dict[str, tuple[str, str | None]]
    notes: tuple[str, ...] = ()

    @property
    def train(self) -> ImageSet:
        return self.splits["train"]
