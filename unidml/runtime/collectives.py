"""The process-group helpers every layer shares, so "is a process group active" has one meaning.

`process_group_active()`: torch.distributed is initialised (any world size). `world_size()` and
`rank()` are 1 and 0 without a group. Cross-rank references (`gather_references`) are
all-gathered with autograd through `torch.distributed.nn.functional.all_gather`, whose backward
sums each rank's reference gradients back to the owner: with the loss scaled by the world size and
its normalising counts summed over ranks (`all_reduce_sum`), DDP's gradient average equals the
single-process gradient on the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def backend_for(device: torch.device) -> str:
    """The process-group backend for a process computing on `device`: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_group_active() -> bool:
    """True when torch.distributed is initialised (a group of one process included)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if process_group_active() else 1


def rank() -> int:
    return dist.get_rank() if process_group_active() else 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a group of several processes)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of a (non-differentiable) tensor over ranks; the tensor itself on a single process."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def gather_references(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
    """(all ranks' x concatenated with autograd, their labels, this rank's row offset in them)."""
    from torch.distributed.nn.functional import all_gather

    world = world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=y.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=y.device))
    if any(int(s) != x.shape[0] for s in sizes):
        raise ValueError(f"cross_rank losses need the same batch size on every rank, got {[int(s) for s in sizes]}")
    refs = torch.cat(all_gather(x.contiguous()), dim=0)
    labels = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(labels, y.contiguous())
    return refs, torch.cat(labels), rank() * x.shape[0]
