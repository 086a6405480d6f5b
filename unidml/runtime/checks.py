"""Input checks that never make the host wait for the device.

Reading a device value on the host (`int(t.max())`) stalls the CPU until the GPU catches up: one
such read per training step is enough to empty the GPU's queue. `check_range` asserts on the device
instead (`torch._assert_async`, as PyTorch's own kernels check class indices): on a CPU tensor it
raises at once, as a one-line ValueError; on CUDA a violation stops the run with a device-side
assert at the next synchronisation.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_range(values: Tensor, low: int, high: int, what: str) -> None:
    """Every entry of `values` lies in [low, high), else ValueError '`what` must lie in [low, high)'."""
    if values.numel() == 0:
        return
    message = f"{what} must lie in [{low}, {high})"
    inside = ((values >= low) & (values < high)).all()
    try:
        torch._assert_async(inside, message)
    except RuntimeError:  # raised at once for a CPU tensor
        raise ValueError(message) from None
