"""One entry point for the three pairwise backends: reference | tiled | triton.

`resolve_backend` is the one decision: a loss calls it once, when it is built, for the device it
will run on; `pairwise_rows` then only dispatches to the backend it returned.
"""
from __future__ import annotations

import torch
from torch import Tensor

from unidml.kernels.backend_choice import choose_kernel_backend
from unidml.kernels.pairwise.reference import reference_rows
from unidml.kernels.pairwise.rows import fused_kernel_args
from unidml.kernels.pairwise.tiled import tiled_rows


def triton_supports(spec) -> bool:
    """Whether a fused Triton kernel exists for this row program."""
    return fused_kernel_args(spec) is not None


def resolve_backend(backend: str, spec, device: torch.device) -> str:
    """The concrete backend for row program `spec` on `device` (the rule: `choose_kernel_backend`)."""
    return choose_kernel_backend(backend, device, triton_supports(spec), str(spec))


HALF_DTYPES = (torch.bfloat16, torch.float16)


def operand_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The one dtype the pair values are computed from: the promotion of the operands' dtypes
    (bf16 with fp32 gives fp32, bf16 with fp16 gives fp32, so no operand is rounded), kept in half
    precision only when every operand is that half type; anything else (fp64) becomes fp32, the
    accumulation type of every backend."""
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype if dtype in HALF_DTYPES else torch.float32


def pairwise_rows(spec, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, self_offset: int | None,
                  backend: str, chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts), both (n, 2), of row program `spec` on a resolved `backend`.

    Anchors and references are cast here, once, to `operand_dtype` (the Triton kernels feed both to
    one `tl.dot`, which needs one dtype); the reference and tiled backends then compute in fp32 from
    those same values, so every backend sees identical operands.
    """
    dtype = operand_dtype(x.dtype, r.dtype)
    x, r = x.to(dtype), r.to(dtype)
    if backend == "reference":
        return reference_rows(spec, x.float(), r.float(), y, ref_y, self_offset)
    if backend == "tiled":
        return tiled_rows(spec, x.float(), r.float(), y, ref_y, self_offset, chunk_rows)
    if backend == "triton":
        from unidml.kernels.pairwise.triton_backend import triton_rows

        return triton_rows(spec, x, r, y, ref_y, self_offset)
    raise ValueError(f"backend '{backend}' is not resolved: pass it through resolve_backend first")
