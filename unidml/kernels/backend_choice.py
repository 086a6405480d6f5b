"""The one rule that turns a loss's `backend` setting into a concrete kernel backend.

Shared by the pairwise and the classifier dispatchers so `auto`, the triton fallback and the
one-line refusals mean the same thing for every fused loss.
"""
from __future__ import annotations

import os

import torch

from unidml.extras import announce_fallback, install_hint, installed

BACKENDS = ("auto", "reference", "tiled", "triton")


def choose_kernel_backend(backend: str, device: torch.device, has_kernel: bool = True, what: str = "") -> str:
    """The concrete backend on `device`: `auto` = triton on CUDA when a kernel exists (`has_kernel`) and
    triton is installed (else tiled, said once), tiled otherwise; an explicit choice is checked
    (ValueError, one line; `what` names the computation without a kernel). The meta device (config
    validation, before the run's device is known) checks only what holds on every device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "auto":
        if device.type != "cuda" or not has_kernel:
            return "tiled"
        if installed("triton"):
            return "triton"
        announce_fallback("triton", "the tiled kernels")
        return "tiled"
    if backend == "triton" and not installed("triton"):
        raise ValueError(f"backend 'triton' needs the triton package ({install_hint('triton')}); use 'tiled' or 'auto'")
    if backend == "triton" and not has_kernel:
        raise ValueError(f"no triton kernel for {what}; use backend 'tiled'")
    runnable = device.type in ("cuda", "meta") or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and not runnable:
        raise ValueError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1); use 'tiled' or 'auto'")
    return backend
