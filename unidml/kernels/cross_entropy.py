"""Cross-entropy with its own classifier head (linear or cosine), temperature and label smoothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unidml.kernels.base import DecomposedLoss
from unidml.kernels.registry import register_loss


def smoothed_targets(labels: Tensor, num_classes: int, epsilon: float) -> Tensor:
    """Targets 1-ε on the true class and ε/(K-1) elsewhere (the paper's convention, not torch's)."""
    if num_classes == 1:
        return torch.ones(labels.shape[0], 1, device=labels.device)
    off = epsilon / (num_classes - 1)
    q = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return q.scatter_(1, labels.long()[:, None], 1.0 - epsilon)


@register_loss("cross_entropy")
class CrossEntropyLoss(DecomposedLoss):
    """Softmax cross-entropy over a classifier this loss owns.

    tightness = -(1/n) Σ_i Σ_k q_ik logit_ik (the -φ_yᵀz part), contrast = (1/n) Σ_i log Σ_k e^{logit_ik}.
    Dropout acts on the embedding before the head during training; `logits()` never drops.
    """

    def __init__(self, num_classes: int, embedding_dim: int, label_smoothing: float = 0.1,
                 dropout: float = 0.5, normalized: bool = False, temperature: float = 1.0,
                 bias: bool = True, zero_init: bool = True) -> None:
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(f"num_classes and embedding_dim must be >= 1, got {num_classes}, {embedding_dim}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if normalized and zero_init:
            raise ValueError("normalized=True needs zero_init=False (a zero weight has no direction)")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.normalized = normalized
        self.temperature = temperature
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embedding_dim, num_classes, bias=bias)
        if zero_init:
            nn.init.zeros_(self.head.weight)
        if bias:
            nn.init.zeros_(self.head.bias)

    def logits(self, embeddings: Tensor) -> Tensor:
        """Classifier logits (fp32, no dropout): (n, num_classes)."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self._logits(embeddings.float())

    def _logits(self, z: Tensor) -> Tensor:
        weight = self.head.weight.float()
        if self.normalized:
            z, weight = F.normalize(z, dim=1), F.normalize(weight, dim=1)
        bias = None if self.head.bias is None else self.head.bias.float()
        return F.linear(z, weight, bias) / self.temperature

    def compute(self, z: Tensor, y: Tensor, ref_z: Tensor | None,
                ref_y: Tensor | None) -> tuple[Tensor, Tensor]:
        if ref_z is not None:
            raise ValueError("cross_entropy takes no reference embeddings")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]")
        logits = self._logits(self.dropout(z.float()))
        q = smoothed_targets(y, self.num_classes, self.label_smoothing)
        tightness = -(q * logits).sum(1).mean()
        contrast = torch.logsumexp(logits, dim=1).mean()
        return tightness, contrast
