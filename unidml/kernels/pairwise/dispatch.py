"""One entry point for the three pairwise backends: reference | tiled | triton.

`resolve_backend` is the one decision: a loss calls it once, when it is built, for the device it
will run on; `pairwise_rows` then only dispatches to the backend it returned.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from unidml.extras import announce_fallback, install_hint, installed
from unidml.kernels.pairwise.reference import reference_rows
from unidml.kernels.pairwise.rows import fused_kernel_args
from unidml.kernels.pairwise.tiled import tiled_rows

BACKENDS = ("auto", "reference", "tiled", "triton")


def triton_supports(spec) -> bool:
    """Whether a fused Triton kernel exists for this row program."""
    return fused_kernel_args(spec) is not None


def resolve_backend(backend: str, spec, device: torch.device) -> str:
    """The concrete backend for row program `spec` on `device`: `auto` = triton on CUDA where a kernel
    exists and triton is installed (else tiled, said once), tiled otherwise; an explicit choice is
    checked (ValueError, one line).

    The meta device (config validation, before the run's device is known) checks only what holds
    on every device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "auto":
        if device.type != "cuda" or not triton_supports(spec):
            return "tiled"
        if installed("triton"):
            return "triton"
        announce_fallback("triton", "the tiled kernels")
        return "tiled"
    if backend == "triton" and not installed("triton"):
        raise ValueError(f"backend 'triton' needs the triton package ({install_hint('triton')}); use 'tiled' or 'auto'")
    if backend == "triton" and not triton_supports(spec):
        raise ValueError(f"no triton kernel for {spec}; use backend 'tiled'")
    runnable = device.type in ("cuda", "meta") or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and not runnable:
        raise ValueError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1); use 'tiled' or 'auto'")
    return backend


def pairwise_rows(spec, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, self_offset: int | None,
                  backend: str, chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts), both (n, 2), of row program `spec` on a resolved `backend`."""
    if backend == "reference":
        return reference_rows(spec, x.float(), r.float(), y, ref_y, self_offset)
    if backend == "tiled":
        return tiled_rows(spec, x.float(), r.float(), y, ref_y, self_offset, chunk_rows)
    if backend == "triton":
        from unidml.kernels.pairwise.triton_backend import triton_rows

        return triton_rows(spec, x, r, y, ref_y, self_offset)
    raise ValueError(f"backend '{backend}' is not resolved: pass it through resolve_backend first")
