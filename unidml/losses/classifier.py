"""Shells of the losses that own a classifier head or proxies, on the fused classifier kernels.

`ClassifierLoss` holds the (C, d) weights as a `ClassifierHead` (`loss.head.weight`, optional
`loss.head.bias`; with `head_parallel` each rank holds its class shard) and resolves the backend
once for the run's device. `SoftmaxHeadLoss` is the softmax cross-entropy family on it (plain,
normalised, CosFace, ArcFace, ProxyNCA): dropout on the embedding, scale, label smoothing, margin
and optional PartialFC class sampling, computed without the n × C logits (docs/design.md,
"Classifier and proxy losses").
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unidml.kernels.classifier.dispatch import resolve_backend
from unidml.kernels.classifier.head import ClassifierHead
from unidml.kernels.classifier.sampling import ClassSampler
from unidml.kernels.classifier.softmax import SoftmaxSpec, softmax_terms
from unidml.losses.base import DecomposedLoss, LossInputs
from unidml.runtime.checks import check_range
from unidml.runtime.device import choose_device


class ClassifierLoss(DecomposedLoss):
    """A loss over its own (C, d) class weights: backend resolution, head construction, label checks."""

    def __init__(self, num_classes: int, embedding_dim: int, *, bias: bool, init: Callable[[Tensor], object],
                 backend: str, device: torch.device | str | None, head_parallel: bool,
                 chunk_classes: int | None) -> None:
        super().__init__()
        device = choose_device() if device is None else torch.device(device)
        self.backend = resolve_backend(backend, device)
        if chunk_classes is not None and chunk_classes < 1:
            raise ValueError(f"chunk_classes must be >= 1, got {chunk_classes}")
        self.chunk_classes = chunk_classes
        self.num_classes = num_classes
        self.head = ClassifierHead(num_classes, embedding_dim, bias=bias, parallel=head_parallel, init=init,
                                   device=device if device.type == "meta" else None)

    def checked_labels(self, inputs: LossInputs) -> Tensor:
        """The call's labels, refused when references are passed or a label is out of range."""
        if inputs.has_references:
            raise ValueError(f"{type(self).__name__} takes no reference embeddings")
        y = inputs.labels
        check_range(y, 0, self.num_classes, "labels")  # on the device: no host sync
        return y


class SoftmaxHeadLoss(ClassifierLoss):
    """Softmax cross-entropy on the head: tightness −(1/n)Σ_i Σ_k q_ik l_ik, contrast (1/n)Σ_i LSE_k l_ik.

    Dropout acts on the embedding before the head during training. `logits(z)` gives the plain
    logits (no dropout, no margin) for diagnostics; it is None when the classes are sharded over
    ranks (no rank holds them all).
    """

    def __init__(self, num_classes: int, embedding_dim: int, *, spec: SoftmaxSpec, dropout: float, bias: bool,
                 init: Callable[[Tensor], object], backend: str, device: torch.device | str | None,
                 head_parallel: bool, sample_rate: float, sample_seed: int, chunk_classes: int | None) -> None:
        super().__init__(num_classes, embedding_dim, bias=bias, init=init, backend=backend, device=device,
                         head_parallel=head_parallel, chunk_classes=chunk_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.spec = spec
        self.dropout = nn.Dropout(dropout)
        self.sampler = ClassSampler(sample_rate, sample_seed) if sample_rate < 1.0 else None

    @property
    def label_smoothing(self) -> float:
        return self.spec.label_smoothing

    def compute(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        y = self.checked_labels(inputs)
        return softmax_terms(self.head, self.dropout(inputs.embeddings), y, self.spec, self.backend,
                             self.chunk_classes, self.sampler)

    @property
    def logits(self) -> Callable[[Tensor], Tensor] | None:
        return None if self.head.distributed else self._logits

    def _logits(self, embeddings: Tensor) -> Tensor:
        """Classifier logits (fp32, no dropout, no margin): (n, num_classes)."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            z, w = embeddings.float(), self.head.weight.float()
            if self.spec.normalized:
                z, w = F.normalize(z, dim=1), F.normalize(w, dim=1)
            bias = None if self.head.bias is None else self.head.bias.float()
            return self.spec.scale * F.linear(z, w, bias)
