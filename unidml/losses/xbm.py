"""Cross-batch memory (XBM, Wang et al. 2020) for every pairwise loss: `<loss>+xbm`.

A FIFO bank of the last `size` embeddings and labels of the global batch (all-gathered in rank
order, so it is identical on every rank), detached, in the form the loss compares (normalised
when it is). From training step `start_step` on, each step enqueues the current global batch and
adds `weight` × the loss of this rank's anchors against the whole bank (their own entries excluded
by index, counts summed over ranks) to the in-batch loss, through the same fused kernels. The bank
and its position are buffers, so checkpoints carry them and a resumed run continues with the same
bank. With `size` a multiple of the global batch the bank holds exactly the last size/batch batches;
otherwise a batch that would wrap is written at the start. Evaluation-mode calls use the plain loss.

Config: `loss.name: multi_similarity+xbm` with `loss.memory: {size: 4096, start_step: 100}`, or
`loss.memory` on the plain pairwise name (the registry picks the `+xbm` variant).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from unidml.losses.base import DecomposedLoss, LossInputs, PairwiseLoss
from unidml.losses.registry import on_register, register_loss
from unidml.runtime.collectives import rank, world_size

SUFFIX = "+xbm"
MEMORY_KEYS = {"size": 4096, "start_step": 0, "weight": 1.0}


def memory_settings(memory: dict[str, Any] | None) -> dict[str, Any]:
    """`loss.memory` with defaults filled in and each value checked (one-line ValueError)."""
    settings = dict(MEMORY_KEYS)
    for key, value in (memory or {}).items():
        if key not in MEMORY_KEYS:
            raise ValueError(f"unknown memory setting '{key}' (known: {', '.join(MEMORY_KEYS)})")
        settings[key] = value
    if isinstance(settings["size"], bool) or not isinstance(settings["size"], int) or settings["size"] < 1:
        raise ValueError(f"memory.size must be a positive integer, got {settings['size']!r}")
    if isinstance(settings["start_step"], bool) or not isinstance(settings["start_step"], int) \
            or settings["start_step"] < 0:
        raise ValueError(f"memory.start_step must be an integer >= 0, got {settings['start_step']!r}")
    if isinstance(settings["weight"], bool) or not isinstance(settings["weight"], (int, float)) \
            or settings["weight"] <= 0:
        raise ValueError(f"memory.weight must be a number > 0, got {settings['weight']!r}")
    return settings


class CrossBatchMemoryLoss(DecomposedLoss):
    """A pairwise loss plus `weight` × the same loss against a FIFO memory of past global batches."""

    def __init__(self, loss: PairwiseLoss, embedding_dim: int, memory: dict[str, Any] | None = None) -> None:
        super().__init__()
        settings = memory_settings(memory)
        self.loss = loss
        self.size, self.start_step, self.weight = settings["size"], settings["start_step"], float(settings["weight"])
        self.register_buffer("memory_emb", torch.zeros(self.size, embedding_dim))
        self.register_buffer("memory_labels", torch.zeros(self.size, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # entries in use
        self.register_buffer("position", torch.zeros((), dtype=torch.long))  # where the next batch goes
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training calls so far
        # Host copies of the three counters: reading the buffers each step would sync with the device.
        # The buffers are written alongside (for checkpoints) and read back once after a load.
        self._step = self._filled = self._position = 0
        self.register_load_state_dict_post_hook(lambda module, _keys: module._read_counters())

    def _read_counters(self) -> None:
        self._step, self._filled, self._position = int(self.step), int(self.filled), int(self.position)

    @property
    def spec(self):
        return self.loss.spec

    def compute(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        if inputs.has_references:
            raise ValueError("a loss with cross-batch memory takes no reference embeddings")
        tightness, contrast = self.loss.compute(inputs)
        if not self.training:
            return tightness, contrast
        self._step += 1
        self.step.fill_(self._step)
        if self._step <= self.start_step:
            return tightness, contrast
        x, y = self.loss._prepare(inputs.embeddings), inputs.labels
        start = self._enqueue(x.detach().float(), y)
        refs = self.memory_emb[:self._filled]  # any dtype: the dispatcher casts both operands
        world = world_size()
        mem_t, mem_c = self.loss.terms_against(x, y, refs, self.memory_labels[:self._filled],
                                               start + rank() * x.shape[0], world)
        return tightness + self.weight * mem_t, contrast + self.weight * mem_c

    def _enqueue(self, x: Tensor, y: Tensor) -> int:
        """Write the global batch (rank order) into the bank; return where its block starts."""
        if world_size() > 1:
            xs = [torch.empty_like(x) for _ in range(world_size())]
            ys = [torch.empty_like(y) for _ in range(world_size())]
            dist.all_gather(xs, x.contiguous())
            dist.all_gather(ys, y.contiguous())
            x, y = torch.cat(xs), torch.cat(ys)
        n = x.shape[0]
        if n > self.size:
            raise ValueError(f"memory.size={self.size} is smaller than the global batch ({n})")
        start = self._position if self._position + n <= self.size else 0
        self.memory_emb[start:start + n] = x.to(self.memory_emb)
        self.memory_labels[start:start + n] = y.to(self.memory_labels)
        self._filled, self._position = max(self._filled, start + n), (start + n) % self.size
        self.filled.fill_(self._filled)
        self.position.fill_(self._position)
        return start


def _variant(name: str, inner: type[PairwiseLoss]) -> type[CrossBatchMemoryLoss]:
    """The registered `<name>+xbm` class: the inner loss's parameters plus `memory`."""

    class Variant(CrossBatchMemoryLoss):
        def __init__(self, embedding_dim: int, memory: dict[str, Any] | None = None, **params: Any) -> None:
            super().__init__(inner(**params), embedding_dim, memory)

    inner_params = [p for p in inspect.signature(inner.__init__).parameters.values() if p.name != "self"]
    extra = [inspect.Parameter("embedding_dim", inspect.Parameter.KEYWORD_ONLY, annotation=int),
             inspect.Parameter("memory", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation="dict | None")]
    own = inspect.signature(Variant.__init__).parameters["self"]
    Variant.__init__.__signature__ = inspect.Signature(
        [own, *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inner_params], *extra])
    Variant.__name__ = Variant.__qualname__ = f"{inner.__name__}WithMemory"
    Variant.__doc__ = f"{name} with cross-batch memory (`memory`: size, start_step, weight; see unidml.losses.xbm)."
    return Variant


def _add_variant(name: str, cls: type) -> None:
    if isinstance(cls, type) and issubclass(cls, PairwiseLoss) and SUFFIX not in name:
        register_loss(name + SUFFIX)(_variant(name, cls))


on_register(_add_variant)
