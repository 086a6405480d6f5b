"""Backend-independent loaders: the trainer's `TrainLoader` and the sharded eval loader.

A backend turns lists of dataset indices into device batches and reports the bad images it met;
the loaders own sampling, resume position and the `data.on_error` policy. Training substitutes a
bad image (`Replacements`: another image of its class); evaluation never does, since a stand-in
would be an exact duplicate in the gallery: a bad evaluation image is left out, and the loader
says which (`EvalLoader.unreadable`).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

from unidml.data_pipeline.images import BadImage, BadImageLog
from unidml.data_pipeline.samplers import DistributedBatchSampler
from unidml.seeding import derived_seed

Bad = list[tuple[str, str]]
T = TypeVar("T")
_END = object()


class Batch(NamedTuple):
    """One batch from a backend. `kept` lists the requested dataset indices the rows stand for, in
    row order: all of them when substituting, only the readable ones otherwise (then `images` is
    None when none was)."""

    images: torch.Tensor | None  # float32 NCHW on the device
    labels: torch.Tensor  # int64, one per row
    bad: Bad  # bad images met producing it
    kept: list[int]


class Backend(Protocol):
    paths: tuple[str, ...]

    def batches(self, index_batches: Iterable[list[int]]) -> Iterator[Batch]:
        """One `Batch` per list of dataset indices."""

    def close(self) -> None:
        """Release workers/pipelines after an error; the next `batches` call starts afresh."""

    def set_epoch(self, epoch: int) -> None:
        """Restart the augmentation random stream at a state fixed by (seed, epoch), so a run resumed
        at an epoch boundary draws the same augmentations as an uninterrupted one."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The backend seed of one epoch: `derived_seed(seed, epoch)` within DALI's int32 range."""
    return derived_seed(seed, epoch) % (2**31 - 1)


def _reporting(backend: Backend, index_batches: Iterable[list[int]], bad_log: BadImageLog, action: str
               ) -> Iterator[Batch]:
    """The backend's batches with their bad images passed to `bad_log` (which raises under
    `on_error=fail`); on any error the backend is closed so no worker lingers."""
    batches = backend.batches(index_batches)
    try:
        for batch in batches:
            for path, detail in batch.bad:
                bad_log.report(path, detail, action)
            yield batch
    except Exception:
        batches.close()  # stops a background producer before the backend is reset under it
        backend.close()
        raise


def in_background(items: Iterator[T], depth: int) -> Iterator[T]:
    """Produce `items` on a daemon thread, at most `depth` ahead of the consumer (overlaps a backend
    that releases the GIL with the training step). A producer error re-raises in the consumer;
    closing or abandoning the consumer stops the thread and waits for it."""
    channel: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                channel.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # handed to the consumer, never lost in the thread
            put((False, exc))

    thread = threading.Thread(target=produce, name="unidml-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = channel.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class Replacements:
    """Deterministic stand-ins for a bad sample: the other images of its class (cyclically after it),
    then every other image, so a replacement keeps the batch's class balance whenever possible."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels)
        order = np.argsort(self.labels, kind="stable")
        bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
        self.members = {int(self.labels[g[0]]): g for g in np.split(order, bounds) if len(g)}

    def candidates(self, index: int) -> Iterator[int]:
        yield index
        group = self.members[int(self.labels[index])]
        start = int(np.searchsorted(group, index))
        for k in range(1, len(group)):
            yield int(group[(start + k) % len(group)])
        n = len(self.labels)
        for k in range(1, n):
            j = (index + k) % n
            if self.labels[j] != self.labels[index]:
                yield j

    def first_readable(self, index: int, read: Callable[[int], T], bad: Bad) -> tuple[int, T]:
        """(used index, `read(used index)`) for `index` or its first stand-in that reads; every bad
        file met on the way is appended to `bad`."""
        for candidate in self.candidates(index):
            try:
                return candidate, read(candidate)
            except BadImage as exc:
                bad.append((exc.path, exc.detail))
        raise RuntimeError(f"no readable image left in the split (first bad: {bad[0][0]})")


def read_sample(replacements: Replacements | None, index: int, read: Callable[[int], T], bad: Bad
                ) -> tuple[int, T] | None:
    """(used index, `read(used index)`): with `replacements` (training) `index` or its first stand-in
    that reads; without (evaluation) `index` itself, or None when it is bad. Bad files go to `bad`."""
    if replacements is not None:
        return replacements.first_readable(index, read, bad)
    try:
        return index, read(index)
    except BadImage as exc:
        bad.append((exc.path, exc.detail))
        return None


class TrainLoader:
    """Per-rank training batches `(images, labels)`: images float32 NCHW normalised on the device,
    labels int64 contiguous 0..K-1; drop_last; resumable position within the epoch."""

    def __init__(self, sampler: DistributedBatchSampler, backend: Backend, bad_log: BadImageLog) -> None:
        self.sampler = sampler
        self.backend = backend
        self.bad_log = bad_log

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.backend.set_epoch(epoch)

    @property
    def bad_images(self) -> int:
        """Distinct bad image files replaced so far (skip policy)."""
        return self.bad_log.count

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in _reporting(self.backend, iter(self.sampler), self.bad_log, "replaced"):
            self.sampler.advance()
            yield batch.images, batch.labels


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, end) of rank `rank` when n items are split over `world_size` ranks."""
    return n * rank // world_size, n * (rank + 1) // world_size


class EvalLoader:
    """This rank's contiguous shard in order: `(images, labels, indices)`, no padding or duplicates.

    Unreadable images are left out (never substituted); after a pass, `unreadable` maps each one's
    dataset index to its path. The backend must be built without substitution.
    """

    def __init__(self, backend: Backend, start: int, end: int, batch_size: int, bad_log: BadImageLog) -> None:
        self.backend = backend
        self.indices = list(range(start, end))
        self.batch_size = batch_size
        self.bad_log = bad_log
        self.unreadable: dict[int, str] = {}

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def bad_images(self) -> int:
        return self.bad_log.count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        chunks = [self.indices[i:i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)]
        unreadable: dict[int, str] = {}
        for chunk, batch in zip(chunks, _reporting(self.backend, chunks, self.bad_log, "left out of evaluation")):
            kept = set(batch.kept)
            unreadable.update((i, self.backend.paths[i]) for i in chunk if i not in kept)
            if batch.images is not None:
                yield batch.images, batch.labels, torch.as_tensor(batch.kept, dtype=torch.int64)
        self.unreadable = unreadable
