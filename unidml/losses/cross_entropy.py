"""Cross-entropy with its own classifier head (linear or cosine), temperature and label smoothing.

Computed by the fused classifier kernels: the n × C logits are never formed, so the number of
classes is bounded by the (C, d) weights, not by n·C (docs/design.md, "Classifier and proxy
losses").
"""
from __future__ import annotations

import math

import torch
from torch import nn

from unidml.kernels.classifier.softmax import SoftmaxSpec
from unidml.losses.classifier import SoftmaxHeadLoss
from unidml.losses.registry import register_loss


@register_loss("cross_entropy")
class CrossEntropyLoss(SoftmaxHeadLoss):
    """Softmax cross-entropy over a classifier this loss owns, logits (z·w_k + b_k)/temperature.

    Label smoothing as in the paper: 1 − ε on the true class and ε/(C − 1) on each other one.
    tightness = −(1/n) Σ_i Σ_k q_ik logit_ik (the −φ_yᵀz part), contrast = (1/n) Σ_i log Σ_k e^{logit_ik}.
    `head_parallel` shards the classes over ranks (exact); `sample_rate` < 1 keeps only the batch's
    classes plus a random share of the others per step (PartialFC; an approximation, for speed).
    """

    def __init__(self, num_classes: int, embedding_dim: int, label_smoothing: float = 0.1,
                 dropout: float = 0.5, normalized: bool = False, temperature: float = 1.0,
                 bias: bool = True, zero_init: bool = True, backend: str = "auto",
                 device: torch.device | str | None = None, head_parallel: bool = False, sample_rate: float = 1.0,
                 sample_seed: int = 0, chunk_classes: int | None = None) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if normalized and zero_init:
            raise ValueError("normalized=True needs zero_init=False (a zero weight has no direction)")
        init = nn.init.zeros_ if zero_init else (lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)))
        spec = SoftmaxSpec(scale=1.0 / temperature, normalized=normalized, label_smoothing=label_smoothing)
        super().__init__(num_classes, embedding_dim, spec=spec, dropout=dropout, bias=bias, init=init,
                         backend=backend, device=device, head_parallel=head_parallel, sample_rate=sample_rate,
                         sample_seed=sample_seed, chunk_classes=chunk_classes)
        self.normalized = normalized
        self.temperature = temperature
