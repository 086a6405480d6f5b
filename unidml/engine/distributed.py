"""Process-group set-up from the launcher's environment (torchrun, deepspeed, SLURM) or none."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from unidml.runtime.collectives import backend_for, process_group_active
from unidml.runtime.device import choose_device
from unidml.runtime.peers import record_peers


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


TIMEOUT = timedelta(minutes=30)


def _restart_scoped_store(world_size: int) -> dist.Store | None:
    """Under torchrun the agent's TCPStore outlives a group restart (`--max-restarts`), and the new
    attempt could read the failed attempt's keys (e.g. gloo peer addresses: "Connection refused"
    at init). Scope the keys by the restart count; None (the default env:// store) otherwise."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=TIMEOUT)
    return dist.PrefixStore(f"unidml/attempt_{restart}", store)


def init_distributed(requested_device: str = "auto", local_rank_arg: int | None = None) -> DistEnv:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK (NCCL on GPU, gloo on CPU).

    Without those variables (a plain `unidml train`) this is a one-process run.
    `local_rank_arg` is the deepspeed launcher's `--local_rank`, used when LOCAL_RANK is unset.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    device = choose_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not process_group_active():
        dist.init_process_group(backend=backend_for(device), rank=rank, world_size=world_size, timeout=TIMEOUT,
                                store=_restart_scoped_store(world_size))
        record_peers()  # rank -> host, for the line naming a lost rank
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(env: DistEnv) -> None:
    if env.distributed and process_group_active():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average each value over ranks (every rank must pass the same keys); identity in one process."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                          device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return {k: float(v) / env.world_size for k, v in zip(keys, tensor.tolist())}
