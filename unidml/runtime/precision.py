"""Numeric precision of a run (`engine.precision`): its dtype, its autocast context, its loss scaler.

`precision_of(cfg)` is the one place that reads `engine.precision`; everything else receives the
`Precision` it returns (or its name).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from unidml.config import PRECISIONS

# The dtype each precision name computes in.
DTYPES: dict[str, torch.dtype] = dict(zip(PRECISIONS, (torch.float32, torch.bfloat16, torch.float16), strict=True))


@dataclass(frozen=True)
class Precision:
    """fp32 | bf16 | fp16: bf16/fp16 run the forward under autocast (fp32 master weights)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got '{self.name}'")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self, device: torch.device | str) -> ContextManager:
        """Autocast to bf16/fp16 on `device`; a no-op for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """Dynamic loss scaling for fp16; disabled (scale 1, pass-through) for bf16 and fp32."""
        return torch.amp.GradScaler(device.type, enabled=self.name == "fp16")


def precision_of(cfg: Any) -> Precision:
    """The precision a run config asks for (`engine.precision`)."""
    return Precision(str(cfg.engine.precision))


def as_precision(value: Precision | str) -> Precision:
    """A `Precision` from itself or its name (library functions accept both)."""
    return value if isinstance(value, Precision) else Precision(value)
