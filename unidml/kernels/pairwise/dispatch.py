"""One entry point for the three pairwise backends: reference | tiled | triton (auto picks)."""
from __future__ import annotations

import os

from torch import Tensor

from unidml.kernels.pairwise.reference import reference_rows
from unidml.kernels.pairwise.tiled import tiled_rows

BACKENDS = ("auto", "reference", "tiled", "triton")


def triton_supports(spec) -> bool:
    """Whether a fused Triton kernel exists for this row program."""
    return not (spec.name == "triplet" and spec.mining != "batch_hard")


def resolve_backend(backend: str, spec, is_cuda: bool) -> str:
    """`auto` = triton on CUDA (where a kernel exists), tiled otherwise; others are checked."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "auto":
        return "triton" if is_cuda and triton_supports(spec) else "tiled"
    if backend == "triton" and not triton_supports(spec):
        raise ValueError(f"no triton kernel for {spec.name} with mining '{spec.mining}'; use backend 'tiled'")
    if backend == "triton" and not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1); use 'tiled' or 'auto'")
    return backend


def pairwise_rows(spec, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, self_offset: int | None,
                  backend: str, chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts), both (n, 2), of row program `spec` on `backend` (auto resolved here)."""
    chosen = resolve_backend(backend, spec, x.is_cuda)
    if chosen == "reference":
        return reference_rows(spec, x.float(), r.float(), y, ref_y, self_offset)
    if chosen == "tiled":
        return tiled_rows(spec, x.float(), r.float(), y, ref_y, self_offset, chunk_rows)
    from unidml.kernels.pairwise.triton_backend import triton_rows

    return triton_rows(spec, x, r, y, ref_y, self_offset)
