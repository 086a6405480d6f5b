"""Pair values and pair masks shared by every pairwise backend.

A pairwise loss sees, for anchors x (n, d) and references r (m, d), the matrix V of cosine
similarities (`metric="cosine"`, inputs already L2-normalised) or Euclidean distances
(`metric="euclidean"`), plus the positive / negative masks from the labels. Self-pairs are removed by
global index: anchor i is reference column `self_offset + i` (None when anchors and references are
different sets).
"""
from __future__ import annotations

import torch
from torch import Tensor

METRICS = ("cosine", "euclidean")


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt(max(x, 0)) whose gradient is 0 (not inf/NaN) where x <= 0, like torch.cdist at 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def pair_values(dots: Tensor, x_sq: Tensor | None, r_sq: Tensor | None, metric: str) -> Tensor:
    """V from dot products x_i·r_j and squared norms (the norms are only used for `euclidean`)."""
    if metric == "cosine":
        return dots
    return safe_sqrt(x_sq[:, None] + r_sq[None, :] - 2.0 * dots)


def pair_masks(y: Tensor, ref_y: Tensor, row_start: int, self_offset: int | None) -> tuple[Tensor, Tensor]:
    """(positive, negative) boolean masks for anchor rows starting at global row `row_start`."""
    same = y[:, None] == ref_y[None, :]
    if self_offset is not None:
        rows = torch.arange(y.shape[0], device=y.device) + (row_start + self_offset)
        cols = torch.arange(ref_y.shape[0], device=y.device)
        same = same & (rows[:, None] != cols[None, :])
        return same, (y[:, None] != ref_y[None, :])
    return same, ~same
