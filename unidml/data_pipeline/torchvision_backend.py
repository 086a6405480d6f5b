"""torchvision backend: PIL decode + transforms.v2 in DataLoader worker processes.

Workers decode and augment; a bad file is replaced there (see `Replacements`) and reported with the
batch, so the main process applies `data.on_error` and a worker never dies on bad data.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unidml.data_pipeline.images import BadImage, load_rgb
from unidml.data_pipeline.loaders import Bad, Replacements

WORKER_TIMEOUT_S = 600  # a stuck worker raises instead of hanging the run


class DecodedImages(Dataset):
    """Item i → (transformed image, label, bad images met while producing it)."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray, transform: Callable) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.replacements = Replacements(self.labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, Bad]:
        bad: Bad = []
        for candidate in self.replacements.candidates(index):
            try:
                image = load_rgb(self.paths[candidate])
            except BadImage as exc:
                bad.append((exc.path, exc.detail))
                continue
            return self.transform(image), int(self.labels[candidate]), bad
        raise RuntimeError(f"no readable image left in the split (first bad: {bad[0][0]})")


def _collate(samples: list[tuple[torch.Tensor, int, Bad]]) -> tuple[torch.Tensor, torch.Tensor, Bad]:
    images = torch.stack([s[0] for s in samples])
    labels = torch.as_tensor([s[1] for s in samples], dtype=torch.int64)
    return images, labels, [b for s in samples for b in s[2]]


class TorchvisionBackend:
    """Batches through a DataLoader whose batch sampler is the iterable the loader passes in."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray, transform: Callable, *, num_workers: int,
                 device: torch.device, seed: int) -> None:
        self.dataset = DecodedImages(paths, labels, transform)
        self.num_workers = num_workers
        self.device = device
        self.seed = seed
        self._loader: DataLoader | None = None
        self._source = _Reiterable()

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(
                self.dataset, batch_sampler=self._source, num_workers=workers, collate_fn=_collate,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                timeout=WORKER_TIMEOUT_S if workers > 0 else 0,
                prefetch_factor=2 if workers > 0 else None,
                generator=torch.Generator().manual_seed(self.seed))
        return self._loader

    def batches(self, index_batches: Iterable[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, Bad]]:
        self._source.current = index_batches
        non_blocking = self.device.type == "cuda"
        for images, labels, bad in self._dataloader():
            yield images.to(self.device, non_blocking=non_blocking), labels.to(self.device), bad


class _Reiterable:
    """A batch sampler for DataLoader that replays whatever index batches the caller set last
    (so persistent workers survive epochs and resumes)."""

    current: Iterable[list[int]] = ()

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.current)
