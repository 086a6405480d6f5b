"""Reference backend: materialise the full n x m matrix and let autograd differentiate (the oracle)."""
from __future__ import annotations

from torch import Tensor

from unidml.kernels.pairwise.geometry import duplicate_tolerance, pair_masks, pair_metric, squared_norms
from unidml.kernels.pairwise.rows import OracleRowProgram, RowProgram


def pair_matrix(metric_name: str, x: Tensor, r: Tensor) -> Tensor:
    """The whole (n, m) matrix V of pair values of anchors x against references r (differentiable)."""
    metric = pair_metric(metric_name)
    return metric.values(x @ r.T, squared_norms(x)[:, None], squared_norms(r)[None, :], duplicate_tolerance(x.shape[1]))


def reference_rows(spec: RowProgram, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor,
                   self_offset: int | None) -> tuple[Tensor, Tensor]:
    """Per-anchor (sums, counts) of `spec` over the whole matrix at once."""
    v = pair_matrix(spec.metric, x, r)
    pos, neg = pair_masks(y, ref_y, 0, self_offset)
    rows = spec.reference_rows if isinstance(spec, OracleRowProgram) else spec.rows
    return rows(v, pos, neg, pos | neg)
