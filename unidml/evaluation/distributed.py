"""The few collectives evaluation needs. `Collectives(False)` is the one-process case of the same code,
so single-process evaluation works (and never blocks) even inside an initialised process group."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from unidml.runtime.collectives import process_group_active


class Collectives:
    """All-gathers and a broadcast over the default process group, or no-ops for one process."""

    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed and process_group_active()
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0

    def _device(self) -> torch.device:
        """NCCL moves CUDA tensors only; gloo works on CPU tensors."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather_equal(self, array: np.ndarray) -> list[np.ndarray]:
        """Every rank's array (all of the same shape and dtype), in rank order."""
        if not self.distributed:
            return [array]
        local = torch.from_numpy(np.ascontiguousarray(array)).to(self._device())
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return [p.cpu().numpy() for p in parts]

    def all_gather_rows(self, array: np.ndarray) -> list[np.ndarray]:
        """Every rank's array when ranks hold different numbers of rows (same trailing shape, dtype)."""
        if not self.distributed:
            return [array]
        sizes = [int(s[0]) for s in self.all_gather_equal(np.array([len(array)], np.int64))]
        padded = np.zeros((max(sizes),) + array.shape[1:], array.dtype)
        padded[:len(array)] = array
        return [part[:size] for part, size in zip(self.all_gather_equal(padded), sizes)]

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's object on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def first_owner_mask(self, global_ids: np.ndarray) -> np.ndarray:
        """True for the items this rank keeps: the first occurrence of each global index in rank
        order, so that samples a distributed sampler padded (repeated) are counted once."""
        parts = self.all_gather_rows(np.asarray(global_ids, np.int64))
        mine = parts[self.rank]
        earlier = np.concatenate(parts[:self.rank]) if self.rank else np.zeros(0, np.int64)
        keep = np.zeros(len(mine), bool)
        keep[np.unique(mine, return_index=True)[1]] = True
        return keep & ~np.isin(mine, earlier)
