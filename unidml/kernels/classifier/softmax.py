"""Softmax cross-entropy over a (possibly sharded) classifier head, never forming the n × C logits.

Logits l_ik = s·(x_i·v_k + b_k) with v_k = w_k (linear) or ŵ_k and x = ẑ (normalised head). The
target logit may carry a margin: CosFace t = s·(cos θ − m), ArcFace t = s·cos(θ + m) (with the
usual monotone fallback cos θ − m·sin m past θ = π − m); the other logits are untouched. With
label smoothing ε (1 − ε on the true class, ε/(C − 1) on each other class):
  L_i = log(e^{t_i} + Σ_{k≠y} e^{l_ik}) − (1 − ε)·t_i − ε/(C − 1)·Σ_{k≠y} l_ik,
where Σ_{k≠y} l_ik = s·(x_i·Σ_k v_k + Σ_k b_k − x_i·v_y − b_y): the fused kernels return Σ_k v_k,
the target dot and the log-sum-exp over the other classes, so everything else is O(n + C) vectors.
Reported terms: tightness −(1/n)Σ_i[(1 − ε)t_i + ε/(C − 1)Σ_{k≠y} l_ik], contrast (1/n)Σ_i LSE_i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from unidml.kernels.classifier.dispatch import class_scores
from unidml.kernels.classifier.head import ClassifierHead
from unidml.kernels.classifier.sampling import ClassSampler

MARGINS = ("none", "cosface", "arcface")


@dataclass(frozen=True)
class SoftmaxSpec:
    """Head and target settings: scale s, cosine head, label smoothing ε, margin kind and size.

    `margin` is on the cosine for CosFace and in radians for ArcFace.
    """

    scale: float = 1.0
    normalized: bool = False
    label_smoothing: float = 0.0
    margin_kind: str = "none"
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.margin_kind not in MARGINS:
            raise ValueError(f"unknown margin '{self.margin_kind}' (known: {', '.join(MARGINS)})")
        if self.margin_kind != "none" and not self.normalized:
            raise ValueError(f"a {self.margin_kind} margin needs the normalised (cosine) head")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


def margin_cosine(cos: Tensor, spec: SoftmaxSpec) -> Tensor:
    """The target's cosine after the margin (identity without one)."""
    if spec.margin_kind == "cosface":
        return cos - spec.margin
    if spec.margin_kind == "arcface":
        angle = torch.acos(cos.clamp(-1.0, 1.0))
        return torch.where(angle <= math.pi - spec.margin, torch.cos(angle + spec.margin),
                           torch.cos(angle) - spec.margin * math.sin(spec.margin))
    return cos


def softmax_terms(head: ClassifierHead, z: Tensor, y: Tensor, spec: SoftmaxSpec, backend: str,
                  chunk: int | None = None, sampler: ClassSampler | None = None) -> tuple[Tensor, Tensor]:
    """(tightness, contrast) of the softmax cross-entropy of (z, y) on `head` (global batch when sharded)."""
    x = F.normalize(z.float(), dim=1) if spec.normalized else z.float()
    if backend == "triton":
        x = x.to(z.dtype)  # the kernels read half precision directly (fp32 accumulation)
    x, y = head.batch(x, y)
    combine = head.combine()
    targets = head.local_targets(y)
    w, b, num_classes = head.weight, head.bias, head.num_classes
    if sampler is not None and sampler.active:
        kept, targets = sampler.choose(w.shape[0], targets, head.shard.rank)
        w, b = w[kept], None if b is None else b[kept]
        num_classes = int(combine.sum(torch.tensor(float(kept.numel()), device=x.device)))
    scores = class_scores(x, w, b, targets, scale=spec.scale, normalize=spec.normalized, backend=backend,
                          chunk=chunk)
    has = targets >= 0
    dot_t = combine.sum(scores.target)
    bias_t = 0.0 if b is None else combine.sum(torch.where(has, b.float()[targets.clamp_min(0)], 0.0))
    t = spec.scale * (margin_cosine(dot_t, spec) + bias_t)
    contrast = torch.logaddexp(combine.lse(scores.row_lse), t).mean()
    eps = spec.label_smoothing if num_classes > 1 else 0.0
    if eps == 0.0:
        return -t.mean(), contrast
    total = x.float() @ scores.weight_sum
    if b is not None:
        total = total + b.float().sum()
    others = spec.scale * (combine.sum(total) - dot_t - bias_t)
    return -((1.0 - eps) * t + eps / (num_classes - 1) * others).mean(), contrast
