"""Numeric precision of a run (`engine.precision`): its dtype, its autocast context, its loss scaler.

`precision_of(cfg)` is the one place that reads `engine.precision`; everything else receives the
`Precision` it returns (or its name). `auto` is resolved here, once, from the device: bf16 where the
device computes it natively, else fp16 on CUDA and fp32 on a CPU. A CPU without AVX-512 (an AVX2-only
AMD EPYC, say) has no oneDNN bf16 kernels: there autocast emulates bf16 and the quickstart's training step
is about 8x slower than in fp32 (docs/benchmarks.md, "Precision on the CPU").
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from omegaconf import DictConfig, OmegaConf

from unidml.config import AUTO_PRECISION, PRECISIONS
from unidml.runtime.device import choose_device

log = logging.getLogger(__name__)

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


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 at full speed: a CUDA device with bf16 support, or a CPU for which
    oneDNN has bf16 kernels (AVX-512 and newer)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(name: str, device: torch.device | str) -> str:
    """A concrete precision name: `name` itself, or for `auto` the fastest safe one on `device`."""
    if name != AUTO_PRECISION:
        return name
    if native_bf16(device):
        return "bf16"
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def precision_of(cfg: Any) -> Precision:
    """The precision a run config asks for (`engine.precision`, `auto` resolved on `engine.device`)."""
    device = choose_device(str(cfg.engine.device)).type
    return Precision(resolve_precision(str(cfg.engine.precision), device))


def settle_precision(cfg: DictConfig) -> DictConfig:
    """A copy of a run config with `engine.precision` concrete, as the run stores it (config.yaml,
    checkpoints), so that a resumed or re-evaluated run computes as it trained."""
    return OmegaConf.merge(cfg, {"engine": {"precision": precision_of(cfg).name}})


def warn_if_emulated(precision: Precision, device: torch.device | str) -> None:
    """One warning line when a run computes bf16 on a CPU that only emulates it (asked for explicitly:
    `auto` never picks it there)."""
    if precision.name == "bf16" and torch.device(device).type == "cpu" and not native_bf16(device):
        log.warning("engine.precision=bf16 on a CPU without bf16 kernels (no AVX-512): emulated, about 8x "
                    "slower than fp32; engine.precision=auto picks fp32 here")


def as_precision(value: Precision | str, device: torch.device | str = "cpu") -> Precision:
    """A `Precision` from itself or its name, `auto` resolved on `device` (library functions accept both)."""
    return value if isinstance(value, Precision) else Precision(resolve_precision(value, device))
