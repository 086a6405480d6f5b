"""The classifier weights (or proxies) a loss owns: one (C, d) parameter, or this rank's class shard.

With `parallel` (and more than one rank) rank r holds the classes [r·C/W, (r+1)·C/W) as a (C_r, d)
parameter (and a (C_r,) bias). Checkpoints stay independent of the world size: `state_dict` gathers
the shards into the full-range weight and adds `class_ranges` (the (W, 2) ranges it was saved from);
loading slices this rank's range out of a full-range weight, whatever world size wrote it (a plain
single-process head's checkpoint included). Both directions are collective operations under
`parallel`: every rank calls them. The optimizer's per-parameter state of a shard (e.g. SGD momentum)
is made full-range and re-sliced the same way by `gather_optimizer_state` / `slice_optimizer_state`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from unidml.kernels.classifier.parallel import ShardCombine, gather_batch, shard_range
from unidml.runtime.collectives import rank, world_size


@dataclass(frozen=True)
class ClassShard:
    """Which classes of `num_classes` a parameter's rows hold: [start, end) of rank `rank` among `world`."""

    num_classes: int
    world: int
    rank: int

    @property
    def start(self) -> int:
        return shard_range(self.num_classes, self.world, self.rank)[0]

    @property
    def end(self) -> int:
        return shard_range(self.num_classes, self.world, self.rank)[1]

    def ranges(self) -> Tensor:
        """(world, 2) [start, end) of every rank."""
        return torch.tensor([shard_range(self.num_classes, self.world, r) for r in range(self.world)])

    def gather(self, local: Tensor) -> Tensor:
        """The full-range tensor from every rank's rows (collective; padded to equal sizes for the gather)."""
        if self.world == 1:
            return local.detach().clone()
        rows = -(-self.num_classes // self.world)
        padded = local.detach().new_zeros((rows, *local.shape[1:]))
        padded[:local.shape[0]] = local.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:e - s] for p, (s, e) in zip(parts, self.ranges().tolist())])

    def slice(self, full: Tensor, what: str) -> Tensor:
        """This rank's rows of a full-range tensor."""
        if full.shape[0] != self.num_classes:
            raise ValueError(f"{what} has {full.shape[0]} classes, this head has {self.num_classes}")
        return full[self.start:self.end]


class ClassifierHead(nn.Module):
    """weight (C_r, d) and optional bias (C_r,): the whole classifier, or this rank's shard of it.

    `init` fills the full (C, d) weight before slicing, so the starting point is the same at every
    world size. The bias starts at zero.
    """

    def __init__(self, num_classes: int, embedding_dim: int, *, bias: bool, parallel: bool = False,
                 init: Callable[[Tensor], Any] | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(f"num_classes and embedding_dim must be >= 1, got {num_classes}, {embedding_dim}")
        world = world_size() if parallel else 1
        self.parallel = parallel
        self.shard = ClassShard(num_classes, world, rank() if world > 1 else 0)
        full = torch.empty(num_classes, embedding_dim, device=device)
        if init is None:
            nn.init.zeros_(full)
        else:
            init(full)
        self.weight = nn.Parameter(full[self.shard.start:self.shard.end].clone() if world > 1 else full)
        self.bias = nn.Parameter(torch.zeros(self.weight.shape[0], device=device)) if bias else None
        for p in self.parameters():
            p.class_shard = self.shard  # read by the engine (kept out of data-parallel all-reduce) and below
        self._register_load_state_dict_pre_hook(self._slice_loaded)

    @property
    def num_classes(self) -> int:
        return self.shard.num_classes

    @property
    def distributed(self) -> bool:
        """True when the classes are split over several ranks."""
        return self.shard.world > 1

    def combine(self) -> ShardCombine:
        return ShardCombine(self.distributed)

    def batch(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch the head scores: the gathered global batch when sharded, else (z, y)."""
        return gather_batch(z, y) if self.distributed else (z, y)

    def local_targets(self, y: Tensor) -> Tensor:
        """Each label's row in this shard, −1 where the class lives on another rank."""
        y = y.long()
        inside = (y >= self.shard.start) & (y < self.shard.end)
        return torch.where(inside, y - self.shard.start, torch.full_like(y, -1))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.parallel:
            for name, p in self.named_parameters(recurse=False):
                destination[prefix + name] = self.shard.gather(p)
            destination[prefix + "class_ranges"] = self.shard.ranges()

    def _slice_loaded(self, state_dict: dict, prefix: str, *_args) -> None:
        state_dict.pop(prefix + "class_ranges", None)
        for name, p in self.named_parameters(recurse=False):
            key = prefix + name
            if key in state_dict and state_dict[key].shape[0] != p.shape[0]:
                state_dict[key] = self.shard.slice(state_dict[key], key)


def _shard_states(optimizer: torch.optim.Optimizer):
    """(param id in the optimizer's state_dict, its ClassShard) of every class-sharded parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [(i, p.class_shard) for i, p in enumerate(params) if getattr(p, "class_shard", None) is not None]


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with each class shard's per-row state made full-range (collective)."""
    state = optimizer.state_dict()
    for i, shard in _shard_states(optimizer):
        entry = state["state"].get(i, {})
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                entry[key] = shard.gather(value)
    return state


def slice_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full-range optimizer state (see `gather_optimizer_state`) cut to this rank's class shards."""
    for i, shard in _shard_states(optimizer):
        entry = state["state"].get(i, {})
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == shard.num_classes:
                entry[key] = shard.slice(value, f"optimizer state {key}").clone()
    return state


def class_sharded_names(module: nn.Module) -> list[str]:
    """Names of `module`'s parameters split by class over several ranks: data-parallel training must not
    average their gradients (each rank's rows are its own), so DDP is told to ignore them."""
    return [name for name, p in module.named_parameters()
            if getattr(p, "class_shard", None) is not None and p.class_shard.world > 1]


def global_grad_norm(params: list[nn.Parameter]) -> Tensor:
    """L2 norm of the gradients as one process would see it: replicated parameters (identical on every
    rank after the all-reduce) once, class shards summed over ranks (collective when there are any)."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [p.grad for p in params if p.grad is not None and getattr(p, "class_shard", None) is not None
               and p.class_shard.world > 1]
    if not sharded:
        return nn.utils.get_total_norm(grads)
    ids = {id(g) for g in sharded}
    replicated = [g for g in grads if id(g) not in ids]
    shard_sq = nn.utils.get_total_norm(sharded) ** 2
    dist.all_reduce(shard_sq)
    rep_sq = nn.utils.get_total_norm(replicated) ** 2 if replicated else torch.zeros_like(shard_sq)
    return (rep_sq.to(shard_sq) + shard_sq).sqrt()
