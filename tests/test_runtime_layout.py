"""The channels_last rule (CUDA and a convolutional network only) and the determinism switches."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from unidml.runtime.determinism import CUBLAS_WORKSPACE, configure_determinism
from unidml.runtime.memory_format import ChannelsLast, channels_last

CNN = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
VIT_LIKE = nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), nn.Flatten(2), nn.Linear(4, 4))  # patch embedding only
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("requested, device, backend, model, expected", [
    (True, CUDA, "single", CNN, ChannelsLast(weights=True, inputs=True)),
    (True, CUDA, "ddp", CNN, ChannelsLast(weights=True, inputs=True)),
    (True, CUDA, "deepspeed", CNN, ChannelsLast(weights=False, inputs=True)),  # DeepSpeed: inputs only
    (True, CPU, "single", CNN, ChannelsLast(weights=False, inputs=False)),  # contiguous measured faster on CPU
    (True, CUDA, "single", VIT_LIKE, ChannelsLast(weights=False, inputs=False)),
    (False, CUDA, "single", CNN, ChannelsLast(weights=False, inputs=False)),
])
def test_channels_last_rule(requested, device, backend, model, expected):
    assert channels_last(requested, device, backend, model) == expected


@pytest.fixture
def restore_backend_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def flags() -> tuple[bool, bool, bool]:
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled())


def test_determinism_switches(restore_backend_flags):
    configure_determinism(False, CUDA)
    assert flags() == (True, False, False) and "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # fastest kernels
    configure_determinism(True, CUDA)
    assert flags() == (False, True, True) and os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # an op without a deterministic kernel warns
    for deterministic in (False, True):  # the CPU needs none of them
        configure_determinism(deterministic, CPU)
        assert flags() == (False, False, False)
