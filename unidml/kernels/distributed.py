"""Cross-rank references: all-gather with autograd, global self-index, global counts.

Anchors stay on their rank; references are gathered from every rank through
`torch.distributed.nn.functional.all_gather`, whose backward sums each rank's reference gradients
back to the owner. With the loss scaled by the world size and its normalising counts summed over
ranks, DDP's gradient average equals the single-process gradient on the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def cross_rank_active() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if cross_rank_active() else 1


def gather_references(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
    """(all ranks' x concatenated with autograd, their labels, this rank's row offset in them)."""
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=y.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=y.device))
    if any(int(s) != x.shape[0] for s in sizes):
        raise ValueError(f"cross_rank losses need the same batch size on every rank, got {[int(s) for s in sizes]}")
    refs = torch.cat(all_gather(x.contiguous()), dim=0)
    labels = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(labels, y.contiguous())
    return refs, torch.cat(labels), rank * x.shape[0]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of a (non-differentiable) tensor over ranks; identity on a single process."""
    if not cross_rank_active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out
