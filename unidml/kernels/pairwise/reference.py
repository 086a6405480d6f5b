"""Reference backend: materialise the full n x m matrix and let autograd differentiate (the oracle)."""
from __future__ import annotations

from torch import Tensor

from unidml.kernels.pairwise.geometry import pair_masks, pair_values


def reference_rows(spec, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor,
                   self_offset: int | None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts) of `spec` over the whole matrix at once."""
    euclid = spec.metric == "euclidean"
    v = pair_values(x @ r.T, (x * x).sum(1) if euclid else None, (r * r).sum(1) if euclid else None,
                    spec.metric)
    pos, neg = pair_masks(y, ref_y, 0, self_offset)
    rows = getattr(spec, "reference_rows", spec.rows)
    return rows(v, pos, neg, pos | neg)
