"""Seed statistics of the study report: a t confidence interval of a mean, and Welch's test of two losses.

With a handful of seeds the spread between seeds is often as large as the gap between losses; the
report says so instead of ranking by the mean alone.
"""
from __future__ import annotations

import math
from typing import Sequence

LEVEL = 0.95  # confidence level of the intervals and of the distinguishability test


def confidence_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval (low, high) of the mean of `values`; NaN bounds with fewer than two values."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test that `a` and `b` have the same mean (NaN below two values each;
    1 when both are constant and equal, 0 when constant and different)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return math.nan
    if max(a) == min(a) and max(b) == min(b):
        return 1.0 if a[0] == b[0] else 0.0
    return float(stats.ttest_ind(list(a), list(b), equal_var=False).pvalue)


def indistinguishable(scores: dict[str, Sequence[float]], level: float = LEVEL) -> list[tuple[str, str, float]]:
    """Pairs (a, b, p) of losses whose seed scores Welch's test cannot tell apart at `level`."""
    names = list(scores)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            p = welch_p(scores[a], scores[b])
            if math.isfinite(p) and p >= 1 - level:
                pairs.append((a, b, p))
    return pairs
