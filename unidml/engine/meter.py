"""Step timing and logged training scalars (in the manner of MAE's `MetricLogger.log_every`).

A `StepMeter` runs alongside one epoch: it splits wall time into *wait* (the loader producing the
next batch) and *busy* (forward, backward, step), counts images, keeps the per-micro-batch sums the
epoch means come from, drives the progress bar, and assembles the scalars of a logged step.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, TypeVar

import torch
from tqdm import tqdm

T = TypeVar("T")


class StepMeter:
    """Timing, throughput and running sums of one epoch; `timed(loader)` yields the loader's items."""

    def __init__(self, steps: int, images_per_step: int, desc: str, enabled: bool) -> None:
        self.images_per_step = images_per_step
        self.bar = tqdm(total=steps, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
        self.wait = self.busy = 0.0
        self.images = self.steps = 0
        self.sums: dict[str, torch.Tensor] = {}
        self._fetched = self._tick = 0.0

    def timed(self, loader: Iterable[T]) -> Iterator[T]:
        """The loader's items; the time spent waiting for each is charged to `wait`."""
        self._tick = time.perf_counter()
        for item in loader:
            self._fetched = time.perf_counter()
            self.wait += self._fetched - self._tick
            yield item

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one micro-batch's values (detached) to the epoch sums."""
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()

    def done(self, stepped: bool) -> None:
        """The current item is processed: its time since fetching is `busy`; `stepped`: it ended an
        optimizer step (one more bar tick, `images_per_step` more images)."""
        self._tick = time.perf_counter()
        self.busy += self._tick - self._fetched
        if stepped:
            self.steps += 1
            self.images += self.images_per_step
            self.bar.update(1)

    def rates(self) -> dict[str, float]:
        """Images per second, data-wait share (%) and mean step time (ms) so far this epoch."""
        elapsed = self.wait + self.busy
        return {"images_per_s": self.images / elapsed, "data_wait_pct": 100.0 * self.wait / elapsed,
                "step_time_ms": 1000.0 * elapsed / max(1, self.steps)}

    def means(self, count: int) -> dict[str, float]:
        """Epoch means of the summed values over `count` micro-batches."""
        return {key: float(total) / count for key, total in self.sums.items()}

    def show(self, values: dict[str, float]) -> None:
        """Put the loss and throughput of a logged step on the progress bar."""
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{values['images_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()
