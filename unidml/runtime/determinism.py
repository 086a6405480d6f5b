"""`train.deterministic`: the switches that make CUDA runs repeat bitwise, or let cuDNN pick fast kernels.

Off (the default): `cudnn.benchmark` times the convolution algorithms for each new input shape and
keeps the fastest, which may be a non-deterministic one. On: cuDNN uses deterministic algorithms only
and no benchmarking, torch's `use_deterministic_algorithms` picks the deterministic implementation of
ops that have one (`index_add_`, `scatter_add_` and the like accumulate with atomics on CUDA otherwise)
and warns once for an op that has none, and cuBLAS gets a fixed workspace (`CUBLAS_WORKSPACE_CONFIG`),
which its deterministic mode requires. The CPU is deterministic either way. docs/cluster.md says what
still differs between machines.
"""
from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Set cuDNN's, torch's and cuBLAS's switches for this process (before its first CUDA kernel)."""
    cuda = device.type == "cuda"
    if deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = cuda and not deterministic
    torch.backends.cudnn.deterministic = cuda and deterministic
    torch.use_deterministic_algorithms(cuda and deterministic, warn_only=True)
