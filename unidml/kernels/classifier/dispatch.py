"""One entry point for the three classifier-score backends: reference | tiled | triton.

`resolve_backend` is the one decision: a loss calls it once, when it is built, for the device it
will run on; `class_scores` then only dispatches to the backend it returned.
"""
from __future__ import annotations

import torch
from torch import Tensor

from unidml.kernels.backend_choice import choose_kernel_backend
from unidml.kernels.classifier.common import ClassScores, check_inputs
from unidml.kernels.classifier.reference import reference_scores
from unidml.kernels.classifier.tiled import tiled_scores


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete classifier backend on `device` (the rule: `choose_kernel_backend`)."""
    return choose_kernel_backend(backend, device)


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
