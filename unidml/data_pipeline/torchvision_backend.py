"""torchvision backend: transforms.v2 fed by DataLoader worker processes.

Without a GPU, workers decode with PIL and augment; a bad file is replaced there (training, see
`Replacements`) or left out (evaluation) and reported with the batch, so the main process applies
`data.on_error` and a worker never dies on bad data. The `data.max_pixels` limit is checked on the
header before any decoder runs. With a GPU (`decode_device`), workers only read and sanity-check the
bytes; the main process decodes JPEGs batched with `torchvision.io.decode_jpeg` on that device and
augments there, falling back to PIL for what the JPEG decoder rejects (CMYK oddities, PNG-as-JPEG).
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unidml.data_pipeline.images import DEFAULT_MAX_PIXELS, exif_orientation, load_rgb, read_encoded
from unidml.data_pipeline.loaders import Bad, Batch, Replacements, epoch_seed, read_sample

WORKER_TIMEOUT_S = 600  # a stuck worker raises instead of hanging the run


# One item: (payload or None when left out, label or used index, bad images met, requested index).
Item = tuple[object, int, Bad, int]


class DecodedImages(Dataset):
    """Item i → (transformed image or None, label, bad images met while producing it, i)."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray, transform: Callable,
                 replacements: Replacements | None, max_pixels: int) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.replacements = replacements
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        bad: Bad = []
        found = read_sample(self.replacements, index, lambda i: load_rgb(self.paths[i], self.max_pixels), bad)
        if found is None:
            return None, -1, bad, index
        used, image = found
        return self.transform(image), int(self.labels[used]), bad, index


class EncodedFiles(Dataset):
    """Item i → ((file bytes as a uint8 tensor, EXIF orientation) or None, used index, bad images
    met, i): decoding happens later, in the main process."""

    def __init__(self, paths: tuple[str, ...], replacements: Replacements | None, max_pixels: int) -> None:
        self.paths = paths
        self.replacements = replacements
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        bad: Bad = []
        found = read_sample(self.replacements, index, lambda i: read_encoded(self.paths[i], self.max_pixels), bad)
        if found is None:
            return None, -1, bad, index
        used, data = found
        return (torch.frombuffer(bytearray(data), dtype=torch.uint8), exif_orientation(data)), used, bad, index


def _collate_kept(samples: list[Item]) -> tuple[list, list[int], Bad, list[int]]:
    """(payloads, labels or used indices, bad, requested indices) of the items not left out."""
    kept = [s for s in samples if s[0] is not None]
    return [s[0] for s in kept], [s[1] for s in kept], [b for s in samples for b in s[2]], [s[3] for s in kept]


class TensorDecoder:
    """Decodes a batch of encoded files on `device` (batched `decode_jpeg` for JPEGs) and applies
    the transform there; files the tensor decoders reject go through PIL, and files PIL rejects too
    are replaced like in the workers."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray, transform: Callable, device: torch.device,
                 replacements: Replacements | None, max_pixels: int) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.device = device
        self.replacements = replacements
        self.max_pixels = max_pixels

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

    def _pil(self, index: int, bad: Bad) -> tuple[torch.Tensor, int] | None:
        from torchvision.transforms.v2.functional import pil_to_tensor

        found = read_sample(self.replacements, index, lambda i: load_rgb(self.paths[i], self.max_pixels), bad)
        return None if found is None else (pil_to_tensor(found[1]).to(self.device), found[0])

    def __call__(self, encoded: list[tuple[torch.Tensor, int]], used: list[int], bad: Bad, requested: list[int]
                 ) -> tuple[torch.Tensor | None, torch.Tensor, list[int]]:
        """(images, labels, the requested indices they stand for) of one batch."""
        is_jpeg = [bool(data[:2].tolist() == [0xFF, 0xD8]) for data, _ in encoded]
        jpegs = [data for (data, _), jpeg in zip(encoded, is_jpeg) if jpeg]
        decoded = iter(self._decode_jpegs(jpegs) if jpegs else [])
        images, labels, kept = [], [], []
        for index, want, (_, orientation), jpeg in zip(used, requested, encoded, is_jpeg):
            image = next(decoded) if jpeg else None
            if image is None:  # PIL applies the orientation itself
                found = self._pil(index, bad)
                if found is None:  # left out (evaluation)
                    continue
                image, index = found
            else:
                image = orient(image, orientation)
            images.append(self.transform(image))
            labels.append(int(self.labels[index]))
            kept.append(want)
        stacked = torch.stack(images) if images else None
        return stacked, torch.as_tensor(labels, dtype=torch.int64, device=self.device), kept


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF orientation 1..8 to a CHW tensor (as PIL's `ImageOps.exif_transpose`)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-1, -2)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


def _collate(samples: list[Item]) -> tuple[torch.Tensor | None, torch.Tensor, Bad, list[int]]:
    images, labels, bad, kept = _collate_kept(samples)
    return (torch.stack(images) if images else None), torch.as_tensor(labels, dtype=torch.int64), bad, kept


class TorchvisionBackend:
    """Batches through a DataLoader whose batch sampler is the iterable the loader passes in;
    `decode_device` moves decoding and augmentation out of the workers onto that device.
    `substitute` replaces bad images (training); without it they are left out (evaluation)."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray, transform: Callable, *, num_workers: int,
                 device: torch.device, seed: int, decode_device: torch.device | None = None, substitute: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.paths = paths
        replacements = Replacements(labels) if substitute else None
        if decode_device is None:
            self.dataset = DecodedImages(paths, labels, transform, replacements, max_pixels)
            self.collate, self.decoder = _collate, None
        else:
            self.dataset, self.collate = EncodedFiles(paths, replacements, max_pixels), _collate_kept
            self.decoder = TensorDecoder(paths, labels, transform, decode_device, replacements, max_pixels)
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

    def batches(self, index_batches: Iterable[list[int]]) -> Iterator[Batch]:
        self._source.current = index_batches
        non_blocking = self.device.type == "cuda"
        for first, second, bad, kept in self._dataloader():
            if self.decoder is not None:
                first, second, kept = self.decoder(first, second, bad, kept)
            images = first.to(self.device, non_blocking=non_blocking) if first is not None else None
            yield Batch(images, second.to(self.device), bad, kept)

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
    """A batch sampler for DataLoader that replays whatever index batches the caller set last, so one
    DataLoader and its persistent workers serve every pass until `set_epoch` (or `close`) replaces them."""

    current: Iterable[list[int]] = ()

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.current)
