"""Proxy-Anchor (Kim et al. 2020) on the fused column reductions of the classifier-score kernels.

With s_ip the cosine of embedding i and proxy p, P⁺ the proxies of the classes in the batch:
  L = (1/|P⁺|) Σ_{p∈P⁺} log(1 + Σ_{i:y_i=p} e^{−α(s_ip − δ)}) + (1/C) Σ_p log(1 + Σ_{i:y_i≠p} e^{α(s_ip + δ)}).
The positive part needs only the n target cosines (a per-class log-sum-exp over the batch); the
negative part is softplus(col_lse_p + αδ) with col_lse the fused per-proxy log-sum-exp of α·s_ip
over the non-positive rows, one chunked pass over the proxies. Tightness = positive part,
contrast = negative part.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unidml.kernels.classifier.dispatch import class_scores
from unidml.kernels.classifier.head import ClassifierHead


def log1p_sum_exp_by_group(a: Tensor, group: Tensor, groups: int) -> Tensor:
    """Per group g: log(1 + Σ_{i: group_i = g} e^{a_i}), stable (shifted by the group max, floored at 0)."""
    top = torch.zeros(groups, device=a.device).scatter_reduce(0, group, a.detach(), "amax", include_self=True)
    total = torch.zeros(groups, device=a.device).index_add(0, group, (a - top[group]).exp())
    return top + torch.log(total + (-top).exp())


def proxy_anchor_terms(head: ClassifierHead, z: Tensor, y: Tensor, alpha: float, delta: float, backend: str,
                       chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(positive part, negative part) of Proxy-Anchor for (z, y) against the head's proxies."""
    x = F.normalize(z.float(), dim=1)
    if backend == "triton":
        x = x.to(z.dtype)
    x, y = head.batch(x, y)
    combine = head.combine()
    scores = class_scores(x, head.weight, None, head.local_targets(y), scale=alpha, normalize=True,
                          rows=False, columns=True, backend=backend, chunk=chunk)
    cos_t = combine.sum(scores.target)
    # Grouped over all C classes (an absent class adds exactly log 1 = 0): no data-dependent class set.
    labels = y.long()
    present = torch.zeros(head.num_classes, device=z.device).index_fill_(0, labels, 1.0).sum()
    positive = log1p_sum_exp_by_group(-alpha * (cos_t - delta), labels, head.num_classes).sum() / present
    negative = combine.sum(F.softplus(scores.col_lse + alpha * delta).sum()) / head.num_classes
    return positive, negative
