"""Reference backend: materialise the n × c logits and let autograd differentiate (the oracle)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unidml.kernels.classifier.common import NORM_EPS, ClassScores


def reference_scores(x: Tensor, w: Tensor, bias: Tensor | None, targets: Tensor, scale: float,
                     normalize: bool, rows: bool, columns: bool) -> ClassScores:
    """The four reductions of the module docstring of `common`, from the whole logit matrix."""
    x, w = x.float(), w.float()
    v = F.normalize(w, dim=1, eps=NORM_EPS) if normalize else w
    dots = x @ v.T
    logits = scale * (dots if bias is None else dots + bias.float()[None, :])
    has = targets >= 0
    is_target = torch.zeros_like(logits, dtype=torch.bool)
    is_target[has.nonzero().squeeze(1), targets[has]] = True
    target = torch.where(is_target, dots, torch.zeros_like(dots)).sum(1)
    col_lse = _lse_except(logits, is_target, 0) if columns else logits.new_empty(0)
    row_lse = _lse_except(logits, is_target, 1) if rows else logits.new_empty(0)
    return ClassScores(row_lse, target, col_lse, v.sum(0))


def _lse_except(logits: Tensor, excluded: Tensor, dim: int) -> Tensor:
    """LSE along `dim` over entries not `excluded`; −inf (with zero gradient) where none is left."""
    kept = ~excluded
    empty = ~kept.any(dim, keepdim=True)
    safe = logits.masked_fill(excluded, float("-inf")).masked_fill(empty, 0.0)
    lse = safe.logsumexp(dim)
    return torch.where(empty.squeeze(dim), torch.full_like(lse, float("-inf")), lse)
