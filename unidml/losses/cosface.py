"""CosFace (Wang et al. 2018): cosine classifier with an additive margin on the target cosine.

Logits s·cos θ_ik for the other classes and s·(cos θ_iy − m) for the target. Equals
pytorch-metric-learning's `CosFaceLoss(num_classes, embedding_size, margin, scale)` (its `W` is
this loss's `head.weight` transposed).
"""
from __future__ import annotations

import torch
from torch import nn

from unidml.kernels.classifier.softmax import SoftmaxSpec
from unidml.losses.base import positive
from unidml.losses.classifier import SoftmaxHeadLoss
from unidml.losses.registry import register_loss


@register_loss("cosface")
class CosFaceLoss(SoftmaxHeadLoss):
    """Large-margin cosine loss: `margin` m on the target cosine, `scale` s on every logit."""

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.35, scale: float = 64.0,
                 label_smoothing: float = 0.0, dropout: float = 0.0, backend: str = "auto",
                 device: torch.device | str | None = None, head_parallel: bool = False, sample_rate: float = 1.0,
                 sample_seed: int = 0, chunk_classes: int | None = None) -> None:
        spec = SoftmaxSpec(scale=positive(scale, "scale"), normalized=True, label_smoothing=label_smoothing,
                           margin_kind="cosface", margin=float(margin))
        super().__init__(num_classes, embedding_dim, spec=spec, dropout=dropout, bias=False, init=nn.init.normal_,
                         backend=backend, device=device, head_parallel=head_parallel, sample_rate=sample_rate,
                         sample_seed=sample_seed, chunk_classes=chunk_classes)
        self.margin, self.scale = margin, scale
