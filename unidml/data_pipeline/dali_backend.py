"""NVIDIA DALI backend: our samplers feed encoded files through an external source; DALI decodes
(`device="mixed"` on a GPU, `"cpu"` with `device_id=None` without one) and applies the recipe.

Python reads the bytes and rejects implausible files (`check_encoded`) before DALI sees them. A
decoder error still invalidates a DALI pipeline, so on one the in-flight files are decoded with PIL
to find the culprit, it is replaced, and the pipeline is rebuilt: bad data never kills the run.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import numpy as np
import torch

from unidml.data_pipeline.images import BadImage, load_rgb, read_encoded
from unidml.data_pipeline.loaders import Bad, Replacements
from unidml.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, Recipe

PREFETCH = 1  # one batch in flight: DALI's prefetch queue needs inputs fed ahead in ways that break
# on short epochs and after rebuilds; decoding still runs on `num_threads` threads within the batch


def _resize_shorter_like_torchvision(images, target: int, fn):
    """Shorter side → `target`, longer side → floor(target * long / short), as torchvision's Resize
    (DALI's `resize_shorter` rounds the longer side instead)."""
    from nvidia.dali import math as dmath

    shape = fn.shapes(images)
    height, width = shape[0], shape[1]
    shorter = dmath.min(height, width)
    return fn.resize(images, resize_y=fn.cast(target * height // shorter, dtype=_types().FLOAT),
                     resize_x=fn.cast(target * width // shorter, dtype=_types().FLOAT))


def _types():
    from nvidia.dali import types

    return types


def _augment(images, recipe: Recipe, train: bool, fn, types):
    """The recipe as DALI operators on decoded HWC uint8 images → normalised float CHW."""
    size = recipe.image_size
    mirror = 0
    if train:
        if recipe.train_resize == "shorter":
            images = fn.resize(images, resize_shorter=recipe.resize_size)
        elif recipe.train_resize == "square":
            images = fn.resize(images, resize_x=recipe.resize_size, resize_y=recipe.resize_size)
        images = fn.random_resized_crop(images, size=(size, size), random_area=list(recipe.crop_scale),
                                        random_aspect_ratio=list(recipe.crop_ratio), num_attempts=10)
        if recipe.jitter:
            b, c, s, h = recipe.color_jitter
            images = fn.color_twist(images, brightness=fn.random.uniform(range=(max(0.0, 1 - b), 1 + b)),
                                    contrast=fn.random.uniform(range=(max(0.0, 1 - c), 1 + c)),
                                    saturation=fn.random.uniform(range=(max(0.0, 1 - s), 1 + s)),
                                    hue=fn.random.uniform(range=(-360.0 * h, 360.0 * h)))
        if recipe.hflip:
            mirror = fn.random.coin_flip(probability=0.5)
        crop = None
    else:
        images = _resize_shorter_like_torchvision(images, recipe.resize_size, fn)
        crop = (size, size)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=crop,
                                    crop_pos_x=0.5, crop_pos_y=0.5, mirror=mirror,
                                    mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])


def build_pipeline(recipe: Recipe, *, train: bool, batch_size: int, num_threads: int, device_id: int | None,
                   seed: int):
    """A DALI pipeline with one external input `encoded` (a batch of file contents)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=PREFETCH, exec_async=False, exec_pipelined=False)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
        decoder = "mixed" if device_id is not None else "cpu"
        images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        return _augment(images, recipe, train, fn, types)

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliBackend:
    """Batches of `(images, labels, bad)` from a per-rank DALI pipeline (one per backend object)."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray, recipe: Recipe, *, train: bool, batch_size: int,
                 num_threads: int, device: torch.device, seed: int) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.recipe = recipe
        self.train = train
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.device = device
        self.device_id = (device.index or 0) if device.type == "cuda" else None
        self.seed = seed
        self.replacements = Replacements(self.labels)
        self.known_bad: dict[int, tuple[str, str]] = {}
        self._pipe = None
        self._rebuilds = 0

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(self.recipe, train=self.train, batch_size=self.batch_size,
                                        num_threads=self.num_threads, device_id=self.device_id,
                                        seed=self.seed + 7919 * self._rebuilds)
        return self._pipe

    def _encoded(self, index: int, bad: Bad) -> tuple[int, np.ndarray]:
        """(used index, file bytes) for `index` or its first plausible replacement."""
        for candidate in self.replacements.candidates(index):
            if candidate in self.known_bad:
                bad.append(self.known_bad[candidate])
                continue
            try:
                return candidate, np.frombuffer(read_encoded(self.paths[candidate]), dtype=np.uint8)
            except BadImage as exc:
                self.known_bad[candidate] = (exc.path, exc.detail)
                bad.append((exc.path, exc.detail))
        raise RuntimeError("no readable image left in the split")

    def _prepare(self, indices: list[int]) -> tuple[list[np.ndarray], list[int], Bad]:
        bad: Bad = []
        used, data = zip(*(self._encoded(i, bad) for i in indices))
        return list(data), list(used), bad

    def _find_undecodable(self, in_flight: Iterable[tuple[list[np.ndarray], list[int], Bad]]) -> None:
        """After a decoder error: mark every in-flight file that PIL cannot decode either as bad."""
        for _, used, _ in in_flight:
            for index in used:
                try:
                    load_rgb(self.paths[index])
                except BadImage as exc:
                    self.known_bad[index] = (exc.path, exc.detail)

    def _to_torch(self, output) -> torch.Tensor:
        if self.device_id is None:
            return torch.from_numpy(np.array(output.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = output.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def batches(self, index_batches: Iterable[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, Bad]]:
        source = iter(index_batches)
        pending: deque[list[int]] = deque()  # sampler batches not yet delivered, in order
        fed: deque[tuple[list[np.ndarray], list[int], Bad]] = deque()
        while True:
            while len(fed) < PREFETCH:
                nxt = next(source, None)
                if nxt is None:
                    break
                pending.append(nxt)
                fed.append(self._feed(self._prepare(nxt)))
            if not fed:
                return
            try:
                (output,) = self._pipeline().run()
            except RuntimeError as exc:
                self._recover(pending, fed, exc)
                continue
            _, used, bad = fed.popleft()
            pending.popleft()
            images = self._to_torch(output)
            yield images, torch.as_tensor(self.labels[used], dtype=torch.int64, device=self.device), bad

    def _feed(self, prepared: tuple[list[np.ndarray], list[int], Bad]):
        self._pipeline().feed_input("encoded", prepared[0])
        return prepared

    def _recover(self, pending: deque[list[int]], fed: deque, error: RuntimeError) -> None:
        """Rebuild the pipeline after a decoder error and re-feed the in-flight batches."""
        known = len(self.known_bad)
        self._find_undecodable(fed)
        if len(self.known_bad) == known:
            raise RuntimeError("DALI pipeline failed on files that PIL decodes (use data.backend=torchvision)") \
                from error
        self._pipe = None
        self._rebuilds += 1
        fed.clear()
        for indices in pending:
            fed.append(self._feed(self._prepare(indices)))
