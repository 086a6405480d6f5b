"""The one rule that picks a process's device from `engine.device` (auto | cpu | cuda)."""
from __future__ import annotations

import torch

from unidml.errors import UserError


def choose_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: CUDA device `local_rank` when CUDA is available, else the CPU; `cuda` without CUDA fails."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("engine.device=cuda but no CUDA device is available; use engine.device=auto or cpu")
    return torch.device("cuda", local_rank)
