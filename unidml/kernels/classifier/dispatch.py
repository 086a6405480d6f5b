"""One entry point for the three classifier-score backends: reference | tiled | triton.

`resolve_backend` is the one decision: a loss calls it once, when it is built, for the device it
will run on; `class_scores` then only dispatches to the backend it returned.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from unidml.extras import announce_fallback, install_hint, installed
from unidml.kernels.classifier.common import ClassScores, check_inputs
from unidml.kernels.classifier.reference import reference_scores
from unidml.kernels.classifier.tiled import tiled_scores

BACKENDS = ("auto", "reference", "tiled", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend on `device`: `auto` = triton on CUDA when triton is installed (else tiled,
    said once), tiled otherwise; an explicit choice is checked (ValueError, one line). The meta device
    (config validation, before the run's device is known) checks only what holds on every device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "auto":
        if device.type != "cuda":
            return "tiled"
        if installed("triton"):
            return "triton"
        announce_fallback("triton", "the tiled kernels")
        return "tiled"
    if backend == "triton" and not installed("triton"):
        raise ValueError(f"backend 'triton' needs the triton package ({install_hint('triton')}); use 'tiled' or 'auto'")
    runnable = device.type in ("cuda", "meta") or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and not runnable:
        raise ValueError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1); use 'tiled' or 'auto'")
    return backend


def class_scores(x: Tensor, w: Tensor, bias: Tensor | None, targets: Tensor, *, scale: float = 1.0,
                 normalize: bool = False, rows: bool = True, columns: bool = False, backend: str = "tiled",
                 chunk: int | None = None) -> ClassScores:
    """Row / column log-sum-exps, target dots and Σ_k v_k of x against one weight block (see `common`),
    on a resolved `backend` (reference | tiled | triton).

    targets (n,): each row's target column in `w`, or −1 when its class is not in this block.
    `rows` / `columns`: compute the row / column log-sum-exps (an empty tensor otherwise).
    `chunk` (classes per block) applies to the tiled backend; the Triton one picks its own tiles.
    """
    check_inputs(x, w, bias, targets)
    if backend == "reference":
        return reference_scores(x, w, bias, targets, scale, normalize, rows, columns)
    if backend == "tiled":
        return tiled_scores(x, w, bias, targets, scale, normalize, rows, columns, chunk)
    if backend == "triton":
        from unidml.kernels.classifier.triton_backend import triton_scores

        return triton_scores(x, w, bias, targets, scale, normalize, rows, columns)
    raise ValueError(f"backend '{backend}' is not resolved: pass it through resolve_backend first")
