"""Proxy-Anchor (Kim et al. 2020): every proxy is an anchor over the batch, α = 32, δ = 0.1.

(1/|P⁺|) Σ_{p∈P⁺} log(1 + Σ_{i:y_i=p} e^{−α(s_ip − δ)}) + (1/C) Σ_p log(1 + Σ_{i:y_i≠p} e^{α(s_ip + δ)})
with s the cosine similarity and P⁺ the proxies of the batch's classes. The per-proxy sums over the
batch are column reductions of the fused classifier kernels (never an n × C matrix). Equals
pytorch-metric-learning's `ProxyAnchorLoss(num_classes, embedding_size, margin, alpha)` (same
proxy initialisation: Kaiming normal, fan-out). Terms: tightness = the positive part, contrast =
the negative part.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unidml.kernels.classifier.proxy_anchor import proxy_anchor_terms
from unidml.losses.base import LossInputs, positive
from unidml.losses.classifier import ClassifierLoss
from unidml.losses.registry import register_loss


@register_loss("proxy_anchor")
class ProxyAnchorLoss(ClassifierLoss):
    """Proxy-Anchor loss with `margin` δ and `alpha` α over one learned proxy per class (`head.weight`)."""

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0,
                 backend: str = "auto", device: torch.device | str | None = None, head_parallel: bool = False,
                 chunk_classes: int | None = None) -> None:
        super().__init__(num_classes, embedding_dim, bias=False,
                         init=lambda w: nn.init.kaiming_normal_(w, mode="fan_out"), backend=backend, device=device,
                         head_parallel=head_parallel, chunk_classes=chunk_classes)
        self.margin, self.alpha = float(margin), positive(alpha, "alpha")

    @property
    def proxies(self) -> Tensor:
        return self.head.weight

    def compute(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        y = self.checked_labels(inputs)
        return proxy_anchor_terms(self.head, inputs.embeddings, y, self.alpha, self.margin, self.backend,
                                  self.chunk_classes)
