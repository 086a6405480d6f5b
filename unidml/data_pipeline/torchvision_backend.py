"""torchvision backend: transforms.v2 fed by DataLoader worker processes.

Without a GPU, workers decode with PIL and augment; a bad file is replaced there (see
`Replacements`) and reported with the batch, so the main process applies `data.on_error` and a
worker never dies on bad data. With a GPU (`decode_device`), workers only read and sanity-check the
bytes; the main process decodes JPEGs batched with `torchvision.io.decode_jpeg` on that device and
augments there, falling back to PIL for what the JPEG decoder rejects (CMYK oddities, PNG-as-JPEG).
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unidml.data_pipeline.images import exif_orientation, load_rgb, read_encoded
from unidml.data_pipeline.loaders import Bad, Replacements, epoch_seed

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
        used, image = self.replacements.first_readable(index, lambda i: load_rgb(self.paths[i]), bad)
        return self.transform(image), int(self.labels[used]), bad


class EncodedFiles(Dataset):
    """Item i → ((file bytes as a uint8 tensor, EXIF orientation), used index, bad images met):
    decoding happens later, in the main process."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray) -> None:
        self.paths = paths
        self.replacements = Replacements(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, int], int, Bad]:
        bad: Bad = []
        used, data = self.replacements.first_readable(index, lambda i: read_encoded(self.paths[i]), bad)
        return (torch.frombuffer(bytearray(data), dtype=torch.uint8), exif_orientation(data)), used, bad


def _collate_encoded(samples: list[tuple[tuple[torch.Tensor, int], int, Bad]]
                     ) -> tuple[list[tuple[torch.Tensor, int]], list[int], Bad]:
    return [s[0] for s in samples], [s[1] for s in samples], [b for s in samples for b in s[2]]


class TensorDecoder:
    """Decodes a batch of encoded files on `device` (batched `decode_jpeg` for JPEGs) and applies
    the transform there; files the tensor decoders reject go through PIL, and files PIL rejects too
    are replaced like in the workers."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray, transform: Callable, device: torch.device) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.device = device
        self.replacements = Replacements(self.labels)

    def _decode_jpegs(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        # EXIF orientation is applied afterwards (`orient`): decode_jpeg ignores it on CUDA
        kwargs = dict(mode=ImageReadMode.RGB, device=self.device)
        with warnings.catch_warnings():
            # torchvision 0.29 flags its codecs as deprecated (for torchcodec); this backend is specified
            # to use them, so the notice is silenced rather than repeated every batch
            warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
            try:
                return list(decode_jpeg(datas, **kwargs))
            except RuntimeError:  # one bad file fails the whole call: retry one by one
                out: list[torch.Tensor | None] = []
                for data in datas:
                    try:
                        out.append(decode_jpeg(data, **kwargs))
                    except RuntimeError:
                        out.append(None)
                return out

    def _pil(self, index: int, bad: Bad) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.v2.functional import pil_to_tensor

        used, image = self.replacements.first_readable(index, lambda i: load_rgb(self.paths[i]), bad)
        return pil_to_tensor(image).to(self.device), used

    def __call__(self, encoded: list[tuple[torch.Tensor, int]], used: list[int], bad: Bad
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        is_jpeg = [bool(data[:2].tolist() == [0xFF, 0xD8]) for data, _ in encoded]
        jpegs = [data for (data, _), jpeg in zip(encoded, is_jpeg) if jpeg]
        decoded = iter(self._decode_jpegs(jpegs) if jpegs else [])
        images, labels = [], []
        for index, (_, orientation), jpeg in zip(used, encoded, is_jpeg):
            image = next(decoded) if jpeg else None
            if image is None:  # PIL applies the orientation itself
                image, index = self._pil(index, bad)
            else:
                image = orient(image, orientation)
            images.append(self.transform(image))
            labels.append(int(self.labels[index]))
        return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64, device=self.device)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF orientation 1..8 to a CHW tensor (as PIL's `ImageOps.exif_transpose`)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-1, -2)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


def _collate(samples: list[tuple[torch.Tensor, int, Bad]]) -> tuple[torch.Tensor, torch.Tensor, Bad]:
    images = torch.stack([s[0] for s in samples])
    labels = torch.as_tensor([s[1] for s in samples], dtype=torch.int64)
    return images, labels, [b for s in samples for b in s[2]]


class TorchvisionBackend:
    """Batches through a DataLoader whose batch sampler is the iterable the loader passes in;
    `decode_device` moves decoding and augmentation out of the workers onto that device."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray, transform: Callable, *, num_workers: int,
                 device: torch.device, seed: int, decode_device: torch.device | None = None) -> None:
        if decode_device is None:
            self.dataset, self.collate, self.decoder = DecodedImages(paths, labels, transform), _collate, None
        else:
            self.dataset, self.collate = EncodedFiles(paths, labels), _collate_encoded
            self.decoder = TensorDecoder(paths, labels, transform, decode_device)
        self.num_workers = num_workers
        self.device = device
        self.seed = seed
        self.epoch = 0
        self._loader: DataLoader | None = None
        self._source = _Reiterable()

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(
                self.dataset, batch_sampler=self._source, num_workers=workers, collate_fn=self.collate,
                pin_memory=self.device.type == "cuda" and self.decoder is None, persistent_workers=workers > 0,
                timeout=WORKER_TIMEOUT_S if workers > 0 else 0,
                prefetch_factor=2 if workers > 0 else None,
                generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        return self._loader

    def batches(self, index_batches: Iterable[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, Bad]]:
        self._source.current = index_batches
        non_blocking = self.device.type == "cuda"
        for first, second, bad in self._dataloader():
            if self.decoder is not None:
                first, second = self.decoder(first, second, bad)
            yield first.to(self.device, non_blocking=non_blocking), second.to(self.device), bad

    def set_epoch(self, epoch: int) -> None:
        """New workers seeded from (seed, epoch). With `num_workers=0` the transforms draw from the
        process's torch RNG instead, which the trainer reseeds per epoch."""
        self.epoch = epoch
        self.close()

    def close(self) -> None:
        """Stop the worker processes now (after an error) instead of whenever the iterator is
        garbage-collected; the next `batches` call starts new ones."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


class _Reiterable:
    """A batch sampler for DataLoader that replays whatever index batches the caller set last
    (so persistent workers survive epochs and resumes)."""

    current: Iterable[list[int]] = ()

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.current)
