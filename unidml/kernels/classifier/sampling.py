"""PartialFC-style class sampling for the softmax head (an approximation, for speed at large C).

At each training step every rank keeps, of its shard, the classes present in the global batch plus
uniformly drawn other classes, `ceil(sample_rate · C_r)` in all (more when the batch holds more
classes). The softmax and the label-smoothing sum then run over the kept classes only, so the loss
and its gradient are those of a smaller classification problem, not of the full one. The draw is
seeded by (seed, step, rank) through `unidml.seeding.derived_seed`, and the step count is a buffer,
so a resumed run draws what an uninterrupted one draws.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from unidml.seeding import derived_seed


class ClassSampler(nn.Module):
    """Chooses the kept classes of one shard per training step (`sample_rate` in (0, 1])."""

    def __init__(self, sample_rate: float, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = sample_rate
        self.seed = seed
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def active(self) -> bool:
        return self.training and self.sample_rate < 1.0

    def choose(self, num_local: int, targets: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """(kept local class ids, sorted; each row's target column among them or −1) for this step."""
        gen = torch.Generator().manual_seed(derived_seed(self.seed, int(self.step), rank))
        self.step += 1
        priority = torch.rand(num_local, generator=gen).to(targets.device)
        present = targets[targets >= 0]
        priority[present] = 2.0  # every positive class is kept
        keep = max(math.ceil(self.sample_rate * num_local), int(present.unique().numel()))
        kept = torch.topk(priority, keep, sorted=False).indices.sort().values
        column = torch.full((num_local,), -1, dtype=torch.long, device=targets.device)
        column[kept] = torch.arange(keep, device=targets.device)
        return kept, torch.where(targets >= 0, column[targets.clamp_min(0)], targets)
