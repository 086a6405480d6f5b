"""Normalised softmax (Zhai & Wu 2019): cosine classifier, logits cos(z, w_k)/temperature.

Equals pytorch-metric-learning's `NormalizedSoftmaxLoss(num_classes, embedding_size, temperature)`
(its `W` is this loss's `head.weight` transposed).
"""
from __future__ import annotations

import torch
from torch import nn

from unidml.kernels.classifier.softmax import SoftmaxSpec
from unidml.losses.base import positive
from unidml.losses.classifier import SoftmaxHeadLoss
from unidml.losses.registry import register_loss


@register_loss("normalized_softmax")
class NormalizedSoftmaxLoss(SoftmaxHeadLoss):
    """Softmax cross-entropy over cosine similarities to L2-normalised class weights, divided by `temperature`."""

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05,
                 label_smoothing: float = 0.0, dropout: float = 0.0, backend: str = "auto",
                 device: torch.device | str | None = None, head_parallel: bool = False, sample_rate: float = 1.0,
                 sample_seed: int = 0, chunk_classes: int | None = None) -> None:
        spec = SoftmaxSpec(scale=1.0 / positive(temperature, "temperature"), normalized=True,
                           label_smoothing=label_smoothing)
        super().__init__(num_classes, embedding_dim, spec=spec, dropout=dropout, bias=False, init=nn.init.normal_,
                         backend=backend, device=device, head_parallel=head_parallel, sample_rate=sample_rate,
                         sample_seed=sample_seed, chunk_classes=chunk_classes)
        self.temperature = temperature
