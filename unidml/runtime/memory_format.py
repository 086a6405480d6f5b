"""The one rule for `engine.channels_last`: where the network and its inputs use the NHWC layout.

channels_last pays on CUDA, where cuDNN's convolutions and tensor cores want NHWC; on the CPU a
contiguous ResNet-18 step measured faster (0.70 s against 0.96 s channels-last, docs/benchmarks.md),
and a network without convolutions (a ViT: its patch embedding is the only one) gains nothing. So the
key asks for it and this rule grants it only on CUDA for a convolutional network. Under DeepSpeed,
which flattens and broadcasts parameters as contiguous buffers, only the inputs go channels_last.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ChannelsLast:
    """Whether the weights (`module.to(memory_format=...)`) and the input batches use channels_last."""

    weights: bool
    inputs: bool


def is_convolutional(model: nn.Module) -> bool:
    """More than one Conv2d: a CNN, not a transformer whose patch embedding is its only convolution."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def channels_last(requested: bool, device: torch.device | str, backend: str, model: nn.Module) -> ChannelsLast:
    """The layout for a run asking `engine.channels_last=requested` on `device` with `engine.backend`."""
    inputs = bool(requested) and torch.device(device).type == "cuda" and is_convolutional(model)
    return ChannelsLast(weights=inputs and backend != "deepspeed", inputs=inputs)
