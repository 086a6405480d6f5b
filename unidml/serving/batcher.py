"""A micro-batching queue: items submitted from many threads within a short window are handed to one
call of `work`, so concurrent queries share one forward pass instead of taking one each."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from unidml.serving.errors import RequestError

T = TypeVar("T")
R = TypeVar("R")
_STOP = object()


@dataclass
class BatchStats:
    """What the queue has done: items answered, successful calls of `work` (batches), the largest batch."""

    items: int = 0
    batches: int = 0
    largest: int = 0


class MicroBatcher(Generic[T, R]):
    """One worker thread takes the first waiting item, collects more for up to `window_s` seconds (at most
    `max_items`) and runs `work(items) -> results`, one result per item. At most `max_waiting` items may
    wait; `submit` beyond that is refused with 503, so a burst cannot grow memory without bound."""

    def __init__(self, work: Callable[[list[T]], list[R]], *, max_items: int, window_s: float,
                 max_waiting: int) -> None:
        self.work, self.max_items, self.window_s = work, max_items, window_s
        self._queue: queue.Queue = queue.Queue(maxsize=max_waiting)
        self._lock = threading.Lock()
        self._stats = BatchStats()
        self._worker = threading.Thread(target=self._loop, name="unidml-batcher", daemon=True)
        self._worker.start()

    def submit(self, item: T) -> tuple[R, int]:
        """The result for `item` and the size of the batch it ran in; raises what `work` raised."""
        future: Future = Future()
        try:
            self._queue.put_nowait((item, future))
        except queue.Full:
            raise RequestError(503, "too many queries waiting; try again shortly") from None
        return future.result()

    def stats(self) -> BatchStats:
        with self._lock:
            return BatchStats(self._stats.items, self._stats.batches, self._stats.largest)

    def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        self._queue.put(_STOP)
        self._worker.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_items and not stop:
                try:
                    entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                stop = entry is _STOP
                if not stop:
                    batch.append(entry)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[tuple[T, Future]]) -> None:
        try:
            results = self.work([item for item, _ in batch])
        except Exception as exc:  # every request of the batch gets the failure; the worker lives on
            for _, future in batch:
                future.set_exception(exc)
            return
        with self._lock:
            self._stats.items += len(batch)
            self._stats.batches += 1
            self._stats.largest = max(self._stats.largest, len(batch))
        for (_, future), result in zip(batch, results):
            future.set_result((result, len(batch)))
