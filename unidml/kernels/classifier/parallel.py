"""Collectives of the class-sharded head: every rank holds the classes [r·C/W, (r+1)·C/W).

Each rank scores the gathered global batch against its shard. Per-row quantities that live on one
shard (the target logit) or split over shards (Σ_k l_ik, the row log-sum-exp) are combined with an
all-reduce whose backward is local: every rank computes the same global loss from the combined
values, so the gradient of a rank's own contribution is exactly what its autograd graph sees, and
the gathered embeddings' gradients (summed back to their owner by the gather's backward) add up to
the single-process gradient. With one process every combine is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from unidml.runtime.collectives import gather_references, world_size


def shard_range(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s classes: r·C/W rounded down (sizes differ by at most one)."""
    return rank * num_classes // world, (rank + 1) * num_classes // world


class _SumOverShards(torch.autograd.Function):
    """Σ over ranks in forward; the gradient of the local term is the upstream one (see the module doc)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _LseOverShards(torch.autograd.Function):
    """log Σ_r exp(lse_r) through an all-reduced max and sum-exp; local backward exp(lse_r − out)·g."""

    @staticmethod
    def forward(ctx, lse: Tensor) -> Tensor:
        top = lse.detach().clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = (lse.detach() - top).exp()
        dist.all_reduce(total)
        out = top + total.log()
        ctx.save_for_backward(lse, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        lse, out = ctx.saved_tensors
        weight = torch.where(torch.isfinite(lse), (lse - out).exp(), torch.zeros_like(lse))
        return grad * weight


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times `factor` (undoes the data-parallel average for the sharded head)."""

    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


class ShardCombine:
    """How per-shard partial results become global ones: identity on one process, all-reduce on several."""

    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed

    def sum(self, t: Tensor) -> Tensor:
        return _SumOverShards.apply(t) if self.distributed else t

    def lse(self, t: Tensor) -> Tensor:
        return _LseOverShards.apply(t) if self.distributed else t


def gather_batch(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' embeddings (autograd through the gather) and labels, concatenated in rank order.

    The local embeddings' gradient is multiplied by the world size first: the loss is the global
    mean, which every rank computes, and data-parallel training averages the replicated parameters'
    gradients over ranks while the head's shard gradient is used as it is.
    """
    gathered, labels, _ = gather_references(_ScaleGrad.apply(z, float(world_size())), y)
    return gathered, labels
