"""ArcFace (Deng et al. 2019): cosine classifier with an additive angular margin on the target.

Logits s·cos θ_ik for the other classes and s·cos(θ_iy + m) for the target, with the usual
monotone fallback cos θ − m·sin m once θ > π − m. `margin` is in degrees, as in
pytorch-metric-learning's `ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)`, which
this loss equals (its `W` is this loss's `head.weight` transposed).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from unidml.kernels.classifier.softmax import SoftmaxSpec
from unidml.losses.base import positive
from unidml.losses.classifier import SoftmaxHeadLoss
from unidml.losses.registry import register_loss


@register_loss("arcface")
class ArcFaceLoss(SoftmaxHeadLoss):
    """Additive angular margin loss: `margin` (degrees) added to the target angle, `scale` s on every logit."""

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 28.6, scale: float = 64.0,
                 label_smoothing: float = 0.0, dropout: float = 0.0, backend: str = "auto",
                 device: torch.device | str | None = None, head_parallel: bool = False, sample_rate: float = 1.0,
                 sample_seed: int = 0, chunk_classes: int | None = None) -> None:
        if not 0.0 <= margin < 180.0:
            raise ValueError(f"margin must be in [0, 180) degrees, got {margin}")
        spec = SoftmaxSpec(scale=positive(scale, "scale"), normalized=True, label_smoothing=label_smoothing,
                           margin_kind="arcface", margin=math.radians(margin))
        super().__init__(num_classes, embedding_dim, spec=spec, dropout=dropout, bias=False, init=nn.init.normal_,
                         backend=backend, device=device, head_parallel=head_parallel, sample_rate=sample_rate,
                         sample_seed=sample_seed, chunk_classes=chunk_classes)
        self.margin, self.scale = margin, scale
