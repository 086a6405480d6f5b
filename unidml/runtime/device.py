"""The one rule that picks a process's device from `engine.device` (auto | cpu | cuda)."""
from __future__ import annotations

import contextlib

import torch

from unidml.errors import UserError


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device index of the process with `local_rank` when it sees `visible` devices.

    A launcher either shows every process all of the node's GPUs (torchrun: rank r takes device r) or
    only its own (SLURM and some schedulers set CUDA_VISIBLE_DEVICES per rank: one visible device,
    index 0, whatever LOCAL_RANK says). `local_rank % visible` covers both.
    """
    if visible < 1:
        raise UserError("engine.device=cuda but no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES)")
    return local_rank % visible


def device_type(requested: str = "auto") -> str:
    """"cuda" when `engine.device=requested` computes on a GPU here, else "cpu" (never fails)."""
    return "cpu" if requested == "cpu" or not torch.cuda.is_available() else "cuda"


def choose_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: this rank's CUDA device (`cuda_index`) when CUDA is available, else the CPU; `cuda`
    without CUDA fails."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("engine.device=cuda but no CUDA device is available; use engine.device=auto or cpu")
    if device_type(requested) == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context making `tensor`'s CUDA device the current one (a no-op for CPU tensors).

    Triton launches a kernel on the current CUDA device, not on its arguments' device: a launch for a
    tensor on another device than the current one would read foreign memory or fail.
    """
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
