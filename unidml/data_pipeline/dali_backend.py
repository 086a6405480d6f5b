"""NVIDIA DALI backend: our samplers feed encoded files through an external source; DALI decodes
(`device="mixed"` on a GPU, `"cpu"` with `device_id=None` without one) and applies the recipe.

Python reads the bytes and rejects implausible files (`check_encoded`) and images larger than
`data.max_pixels` (from the header, once per file) before DALI sees them: DALI would allocate the
full decoded size of a decompression bomb. A decoder error still invalidates a DALI pipeline, so on
one the batch's files are decoded with PIL to find the culprit, it is replaced (training) or left
out (evaluation), and the pipeline is rebuilt: bad data never kills the run.
The pipeline runs synchronously (one batch per `run`, inputs fed just before, so a decoder error
belongs to a known batch) on a background thread that keeps `PREFETCH_BATCHES` ready, so decoding
overlaps the training step; on a GPU the output is copied into the torch batch on a side CUDA stream,
which waits neither for nor on the training step's kernels.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from unidml.data_pipeline.images import DEFAULT_MAX_PIXELS, BadImage, load_rgb, read_encoded
from unidml.data_pipeline.loaders import Bad, Batch, Replacements, epoch_seed, in_background, read_sample
from unidml.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, Recipe

PREFETCH_BATCHES = 2  # batches decoded ahead of the consumer (on a background thread)


def _resize_center_crop_like_torchvision(images, encoded, recipe: Recipe, fn, types):
    """torchvision's test transform, Resize(resize_size) (longer side floor(R * long / short)) then a
    centered `image_size` crop (halves rounded up), as ONE resampling of the source region that
    ends up in the crop: the same sample positions and filter, without the intermediate image.
    The shape comes from the encoded bytes (CPU, EXIF-oriented like the decoder), so this also
    works after a GPU decode."""
    from nvidia.dali import math as dmath

    size, target = recipe.image_size, recipe.resize_size
    shape = fn.peek_image_shape(encoded)
    height, width = shape[0], shape[1]
    shorter = dmath.min(height, width)
    new_h, new_w = target * height // shorter, target * width // shorter
    top, left = (new_h - size + 1) // 2, (new_w - size + 1) // 2
    scale_y = fn.cast(height, dtype=types.FLOAT) / fn.cast(new_h, dtype=types.FLOAT)
    scale_x = fn.cast(width, dtype=types.FLOAT) / fn.cast(new_w, dtype=types.FLOAT)
    start = fn.stack(fn.cast(top, dtype=types.FLOAT) * scale_y, fn.cast(left, dtype=types.FLOAT) * scale_x)
    end = fn.stack(fn.cast(top + size, dtype=types.FLOAT) * scale_y, fn.cast(left + size, dtype=types.FLOAT) * scale_x)
    return fn.resize(images, size=[size, size], roi_start=start, roi_end=end, roi_relative=False)


def _jitter_factors(jitter: tuple[float, float, float, float], fn) -> dict:
    """Random color_twist arguments for the non-zero components of torchvision's ColorJitter
    (b, c, s: factors uniform in [max(0, 1-x), 1+x]; h: hue shift uniform in ±h turns = ±360h degrees)."""
    b, c, s, h = jitter
    factors = {name: fn.random.uniform(range=(max(0.0, 1 - x), 1 + x))
               for name, x in (("brightness", b), ("contrast", c), ("saturation", s)) if x > 0}
    if h > 0:
        factors["hue"] = fn.random.uniform(range=(-360.0 * h, 360.0 * h))
    return factors


def _augment(encoded, recipe: Recipe, train: bool, decoder: str, fn, types):
    """Decode with the recipe's geometry, then jitter/flip/normalise → float CHW.

    Train without a pre-resize decodes only the random crop window (ROI decode) and scales it to
    `image_size`: the same distribution as RandomResizedCrop on the full image, at less decode cost.
    """
    size = recipe.image_size
    crop_args = dict(random_area=list(recipe.crop_scale), random_aspect_ratio=list(recipe.crop_ratio),
                     num_attempts=10)
    if train and recipe.train_resize == "none":
        images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB, **crop_args)
        images = fn.resize(images, resize_x=size, resize_y=size)
    else:
        images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        if not train:
            images = _resize_center_crop_like_torchvision(images, encoded, recipe, fn, types)
        else:
            if recipe.train_resize == "shorter":
                images = fn.resize(images, resize_shorter=recipe.resize_size)
            else:
                images = fn.resize(images, resize_x=recipe.resize_size, resize_y=recipe.resize_size)
            images = fn.random_resized_crop(images, size=(size, size), **crop_args)
    mirror = 0
    if train and recipe.jitter:
        images = fn.color_twist(images, **_jitter_factors(recipe.color_jitter, fn))
    if train and recipe.hflip:
        mirror = fn.random.coin_flip(probability=0.5)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                    mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])


def build_pipeline(recipe: Recipe, *, train: bool, batch_size: int, num_threads: int, device_id: int | None,
                   seed: int):
    """A DALI pipeline with one external input `encoded` (a batch of file contents)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
        return _augment(encoded, recipe, train, "mixed" if device_id is not None else "cpu", fn, types)

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliBackend:
    """`Batch`es from a per-rank DALI pipeline (one per backend object); bad images are replaced
    when training and left out otherwise."""

    def __init__(self, paths: tuple[str, ...], labels: np.ndarray, recipe: Recipe, *, train: bool, batch_size: int,
                 num_threads: int, device: torch.device, seed: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.recipe = recipe
        self.train = train
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.device = device
        self.device_id = (device.index or 0) if device.type == "cuda" else None
        self.seed = seed
        self.replacements = Replacements(self.labels) if train else None
        self.max_pixels = max_pixels
        self.known_bad: dict[int, tuple[str, str]] = {}
        self.size_checked: set[int] = set()  # files whose header passed `max_pixels`
        self._pipe = None
        self._copy_stream: torch.cuda.Stream | None = None  # GPU output copies (`_to_torch`)
        self._rebuilds = 0
        self.epoch = 0

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(self.recipe, train=self.train, batch_size=self.batch_size,
                                        num_threads=self.num_threads, device_id=self.device_id,
                                        seed=(epoch_seed(self.seed, self.epoch) + self._rebuilds) % (2**31 - 1))
        return self._pipe

    def _read(self, index: int) -> np.ndarray:
        """The bytes of a file not known to be bad (BadImage, remembered, if it is)."""
        if index in self.known_bad:
            raise BadImage(*self.known_bad[index])
        try:
            data = read_encoded(self.paths[index], None if index in self.size_checked else self.max_pixels)
        except BadImage as exc:
            self.known_bad[index] = (exc.path, exc.detail)
            raise
        self.size_checked.add(index)
        return np.frombuffer(data, dtype=np.uint8)

    def _prepare(self, indices: list[int]) -> tuple[list[np.ndarray], list[int], Bad, list[int]]:
        """(file bytes, used indices, bad images met, requested indices kept) of one batch."""
        bad: Bad = []
        data, used, kept = [], [], []
        for index in indices:
            found = read_sample(self.replacements, index, self._read, bad)
            if found is not None:
                used.append(found[0])
                data.append(found[1])
                kept.append(index)
        return data, used, bad, kept

    def _mark_undecodable(self, used: list[int]) -> bool:
        """After a decoder error: mark the batch's files PIL cannot decode either; True if any."""
        found = False
        for index in used:
            try:
                load_rgb(self.paths[index], self.max_pixels)
            except BadImage as exc:
                self.known_bad[index] = (exc.path, exc.detail)
                found = True
        return found

    def _mark_undecodable_by_dali(self, used: list[int], data: list[np.ndarray]) -> bool:
        """PIL reads the whole batch but DALI failed: decode the files one by one to find the ones
        this backend truly cannot read, and mark them bad (their detail says so); True if any."""
        known = len(self.known_bad)
        for index, encoded in zip(used, data):
            try:
                self._pipeline().feed_input("encoded", [encoded])
                self._pipeline().run()
            except RuntimeError as exc:
                self._rebuild()
                reason = str(exc).strip().splitlines()[-2:]
                self.known_bad[index] = (self.paths[index], f"DALI cannot decode it ({' '.join(reason)}); "
                                                            f"PIL can: data.backend=torchvision keeps it")
        return len(self.known_bad) > known

    def _rebuild(self) -> None:
        """A failed `run` invalidates a DALI pipeline: the next use builds a fresh one (new seed)."""
        self.close()
        self._rebuilds += 1

    def _to_torch(self, output) -> torch.Tensor:
        if self.device_id is None:
            return torch.from_numpy(np.array(output.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = output.as_tensor()
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        # The copy runs on a side stream of its own: on the training step's stream it would queue
        # behind the step's kernels, and waiting for it (DALI reuses its output buffer on the next run)
        # would wait for the step. Allocated on the side stream, the batch is marked as used by the
        # consumer's stream so the allocator does not reuse it while the step still reads it.
        with torch.cuda.stream(self._copy_stream):
            out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(dense, out, cuda_stream=self._copy_stream)
        self._copy_stream.synchronize()
        out.record_stream(torch.cuda.default_stream(self.device))
        return out

    def _run(self, indices: list[int]) -> Batch:
        """One batch through the pipeline; after a decoder error (which invalidates a DALI
        pipeline) the culprits are marked bad, the pipeline rebuilt and the batch retried."""
        while True:
            data, used, bad, kept = self._prepare(indices)
            if not data:  # every image of an evaluation batch is bad
                return Batch(None, torch.empty(0, dtype=torch.int64, device=self.device), bad, kept)
            pipe = self._pipeline()
            try:
                pipe.feed_input("encoded", data)
                (output,) = pipe.run()
            except RuntimeError as exc:
                self._rebuild()
                if not (self._mark_undecodable(used) or self._mark_undecodable_by_dali(used, data)):
                    raise RuntimeError("DALI failed on a batch whose files all decode one by one") from exc
                continue
            return Batch(self._to_torch(output), torch.as_tensor(self.labels[used], device=self.device), bad, kept)

    def batches(self, index_batches: Iterable[list[int]]) -> Iterator[Batch]:
        """Batches decoded on a background thread (DALI releases the GIL), `PREFETCH_BATCHES` ahead."""
        return in_background((self._run(indices) for indices in index_batches), depth=PREFETCH_BATCHES)

    def set_epoch(self, epoch: int) -> None:
        """A new pipeline seeded from (seed, epoch) serves the epoch."""
        self.epoch = epoch
        self._rebuilds = 0
        self.close()

    def close(self) -> None:
        """Drop the pipeline; it is rebuilt on next use."""
        self._pipe = None
