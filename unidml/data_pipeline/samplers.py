"""Distributed batch samplers with an exact, resumable position.

Every rank builds the same global epoch plan from (seed, epoch): a list of global batches of
`batch_size * world_size` dataset indices. Rank r takes slice [r*b, (r+1)*b) of each global batch,
so ranks get disjoint samples of one permutation and the same number of steps (drop_last).
The position within the epoch is the number of batches already consumed (`advance`, saved by
`state_dict`), and iteration restarts from there, so a resumed run continues with the next batch.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np

from unidml.errors import UserError
from unidml.registry import SAMPLERS


class DistributedBatchSampler:
    """Base: global plan → this rank's batches, epoch bookkeeping and resume position."""

    def __init__(self, labels: np.ndarray, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler shape: batch_size={batch_size} rank={rank} world_size={world_size}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._plan: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_batches(self, epoch: int) -> np.ndarray:
        """The epoch's global batches, shape (steps, global_batch_size); identical on every rank."""
        raise NotImplementedError

    def _global_plan(self) -> np.ndarray:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.global_batches(self.epoch))
        return self._plan[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; a new epoch starts at position 0, the same one keeps it."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def __len__(self) -> int:
        return len(self._global_plan())

    def batch(self, step: int) -> list[int]:
        """This rank's dataset indices for `step` of the current epoch."""
        row = self._global_plan()[step]
        return row[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches from the current position on (loaders prefetch, so the position
        only moves when the consumer calls `advance`)."""
        for step in range(self.position, len(self)):
            yield self.batch(step)

    def advance(self) -> None:
        """Record that one more batch of this epoch was consumed."""
        self.position += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the saved position. The plan depends only on (seed, epoch, global batch), so another
        world size with the same global batch continues the same run (an elastic restart)."""
        saved = int(state.get("global_batch_size", int(state.get("world_size", self.world_size)) * self.batch_size))
        if saved != self.global_batch_size:
            raise UserError(f"sampler state: saved with world_size={state.get('world_size')} (global batch {saved}), "
                            f"resuming with world_size={self.world_size} (global batch {self.global_batch_size}): "
                            f"the epoch plan would differ")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))


class RandomBatchSampler(DistributedBatchSampler):
    """Uniform random permutation per epoch (cross-entropy training), last partial batch dropped."""

    def global_batches(self, epoch: int) -> np.ndarray:
        steps = len(self.labels) // self.global_batch_size
        if steps == 0:
            raise UserError(f"dataset of {len(self.labels)} images is smaller than one global batch "
                            f"({self.global_batch_size})")
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
        return order[:steps * self.global_batch_size].reshape(steps, self.global_batch_size)


class MPerClassBatchSampler(DistributedBatchSampler):
    """P classes x M images per GLOBAL batch (pairwise losses).

    Each class's images are shuffled and cut into chunks of M (a class with fewer than M images
    forms one chunk, completed by drawing its own images again); chunks are shuffled and packed
    into global batches of P chunks of distinct classes. Per-rank batches hold whole chunks
    (M divides the per-rank batch), so ranks never share an index within an epoch.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, rank: int, world_size: int, seed: int, m: int) -> None:
        super().__init__(labels, batch_size, rank, world_size, seed)
        if m <= 0 or batch_size % m:
            raise UserError(f"data.m_per_class={m} must divide the per-rank batch size {batch_size}")
        self.m = m
        self.classes_per_batch = self.global_batch_size // m
        order = np.argsort(self.labels, kind="stable")
        self._members = np.split(order, np.flatnonzero(np.diff(self.labels[order])) + 1)  # indices per class
        if len(self._members) < self.classes_per_batch:
            raise UserError(f"m_per_class sampling needs {self.classes_per_batch} classes per global batch "
                            f"({self.global_batch_size} / {m}) but the split has {len(self._members)}")

    def _chunks(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
        chunks = []
        for cls, members in enumerate(self._members):
            members = rng.permutation(members)
            if len(members) < self.m:
                members = np.concatenate([members, rng.choice(members, self.m - len(members))])
            chunks += [(cls, members[i:i + self.m]) for i in range(0, len(members) - self.m + 1, self.m)]
        order = rng.permutation(len(chunks))
        return [chunks[i] for i in order]

    def global_batches(self, epoch: int) -> np.ndarray:
        pending = deque(self._chunks(np.random.default_rng([self.seed, epoch])))
        batches = []
        while len(pending) >= self.classes_per_batch:
            batch, seen, deferred = [], set(), []
            while pending and len(batch) < self.classes_per_batch:
                cls, chunk = pending.popleft()
                if cls in seen:
                    deferred.append((cls, chunk))
                else:
                    seen.add(cls)
                    batch.append(chunk)
            pending.extendleft(reversed(deferred))
            if len(batch) < self.classes_per_batch:
                break
            batches.append(np.concatenate(batch))
        if not batches:
            raise UserError(f"m_per_class sampling: too few images to fill one global batch of "
                            f"{self.classes_per_batch} classes x {self.m}")
        return np.stack(batches)


SAMPLERS.add("random", lambda labels, batch_size, rank, world_size, seed, m_per_class:
             RandomBatchSampler(labels, batch_size, rank, world_size, seed))
SAMPLERS.add("m_per_class", lambda labels, batch_size, rank, world_size, seed, m_per_class:
             MPerClassBatchSampler(labels, batch_size, rank, world_size, seed, m_per_class))


def build_sampler(kind: str, labels: np.ndarray, *, batch_size: int, rank: int, world_size: int, seed: int,
                  m_per_class: int) -> DistributedBatchSampler:
    """The training sampler registered as `data.sampler` = `kind`."""
    if kind not in SAMPLERS:
        raise UserError(f"data.sampler: unknown sampler '{kind}' (known: {', '.join(SAMPLERS.names())})")
    return SAMPLERS[kind](labels, batch_size, rank, world_size, seed, m_per_class)
