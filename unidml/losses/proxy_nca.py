"""ProxyNCA (Movshovitz-Attias et al. 2017) and ProxyNCA++ (Teh et al. 2020) on the fused classifier kernels.

L_i = −log softmax_k(−softmax_scale·‖ẑ_i − p̂_k‖²) at k = y_i, over L2-normalised embeddings and
proxies. With ‖ẑ − p̂‖² = 2 − 2·cos this is the cosine softmax with scale 2·softmax_scale (the
constant cancels), so it runs on the same kernels. ProxyNCA++'s temperature T is softmax_scale = 1/T.
Equals pytorch-metric-learning's `ProxyNCALoss(num_classes, embedding_size, softmax_scale)` (which
drops the rows whose softmax underflows to exactly 0; this loss keeps them, finite).
Terms: tightness (1/n)Σ_i softmax_scale·‖ẑ_i − p̂_{y_i}‖², contrast (1/n)Σ_i LSE_k(−softmax_scale·‖ẑ_i − p̂_k‖²).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unidml.kernels.classifier.softmax import SoftmaxSpec
from unidml.losses.base import LossInputs, positive
from unidml.losses.classifier import SoftmaxHeadLoss
from unidml.losses.registry import register_loss


@register_loss("proxy_nca")
class ProxyNCALoss(SoftmaxHeadLoss):
    """NCA against one learned proxy per class (`head.weight`, the proxies), with `softmax_scale`."""

    def __init__(self, num_classes: int, embedding_dim: int, softmax_scale: float = 1.0,
                 label_smoothing: float = 0.0, backend: str = "auto", device: torch.device | str | None = None,
                 head_parallel: bool = False, sample_rate: float = 1.0, sample_seed: int = 0,
                 chunk_classes: int | None = None) -> None:
        spec = SoftmaxSpec(scale=2.0 * positive(softmax_scale, "softmax_scale"), normalized=True,
                           label_smoothing=label_smoothing)
        super().__init__(num_classes, embedding_dim, spec=spec, dropout=0.0, bias=False, init=nn.init.normal_,
                         backend=backend, device=device, head_parallel=head_parallel, sample_rate=sample_rate,
                         sample_seed=sample_seed, chunk_classes=chunk_classes)
        self.softmax_scale = softmax_scale

    @property
    def proxies(self) -> Tensor:
        return self.head.weight

    def compute(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        tightness, contrast = super().compute(inputs)
        shift = 2.0 * self.softmax_scale  # the logits as −scale·‖ẑ − p̂‖² = scale·(2 cos − 2)
        return tightness + shift, contrast - shift
