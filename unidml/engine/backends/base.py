"""The interface between the trainer and whatever turns gradients into parameter updates.

A backend owns the optimizer side of a run (optimizer, schedule, loss scaling, gradient reduction,
checkpoint format) around one `TrainStep` module (network + loss). The trainer only talks to it
through `TrainBackend`; gradient caching (`engine.embed_chunks`) needs the few extra members of
`ChunkableBackend`, which `config.validate` allows only for the backends that have them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step: the global gradient norm (before clipping) and whether it was applied."""

    grad_norm: float
    applied: bool


@runtime_checkable
class TrainBackend(Protocol):
    """What the trainer calls, once per micro-batch (`sync`, `forward`, `backward`) or step (`step`)."""

    def forward(self, *inputs: Any) -> torch.Tensor:
        """The `TrainStep`'s output (the loss) for `inputs`, under the run's precision."""

    def set_group(self, micro_batches: int) -> None:
        """The size of the accumulation group the next micro-batches belong to (`engine.accumulation`):
        `train.grad_accum`, or fewer for an epoch's leftover group; losses are averaged over it."""

    def sync(self, enabled: bool) -> ContextManager:
        """Context for one micro-batch's backward: reduce gradients across ranks only when `enabled`."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (accumulation and loss scaling applied)."""

    def step(self) -> StepOutcome:
        """Apply the accumulated gradient (unless it is non-finite), clear it, advance the schedule."""

    @property
    def lr(self) -> float: ...

    @property
    def loss_scale(self) -> float: ...

    def save(self, state: dict[str, Any], directory: Path, is_best: bool) -> None:
        """Write a checkpoint of `state` plus the backend's own state into `directory` (every rank calls it)."""

    def restore(self, source: Path) -> tuple[dict[str, Any], Path] | None:
        """Load the newest usable checkpoint under `source` into the modules and the backend; return it
        (for the trainer's own fields) with its path, or None when there is none."""


@runtime_checkable
class ChunkableBackend(TrainBackend, Protocol):
    """A backend gradient caching can drive: it exposes the unwrapped `TrainStep`, its autocast and the
    scaling it applies to a micro-batch loss before differentiating it."""

    module: nn.Module

    def autocast(self) -> ContextManager:
        """The run's autocast context on this backend's device."""

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """What to differentiate for one micro-batch: loss / its group's size, times any loss scale."""
