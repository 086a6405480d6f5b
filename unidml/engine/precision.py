"""Mixed precision through `torch.amp`: the autocast context and the fp16 loss scaler."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Autocast to bf16/fp16 on `device`; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16; disabled (scale 1, pass-through) for bf16 and fp32."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
