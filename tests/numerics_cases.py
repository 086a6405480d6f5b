"""Float64 oracles and extreme-parameter cases for the row programs' empty-set log-sum-exps.

Each oracle writes the loss's definition directly, anchor by anchor, in float64 (autograd gives its
gradient); the cases put an anchor with an empty kept set next to exponents far beyond fp32's
exp range (beta = 1000, alpha = 1000, temperature = 0.002).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unidml.losses import build_loss


def _lse1p(terms: list) -> torch.Tensor:
    """log(1 + Σ e^t) in float64 (log 1 = 0 for an empty list)."""
    return torch.logsumexp(torch.stack([torch.zeros((), dtype=torch.float64), *terms]), 0)


def multi_similarity_oracle(z: torch.Tensor, y: torch.Tensor, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    """PML's MultiSimilarityLoss over MultiSimilarityMiner(epsilon) pairs, mean over anchors."""
    s = F.normalize(z, dim=1) @ F.normalize(z, dim=1).T
    n, total = len(y), 0.0
    for i in range(n):
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        neg = [j for j in range(n) if y[j] != y[i]]
        hardest_neg = max((s[i, j].item() for j in neg), default=float("-inf"))
        easiest_pos = min((s[i, j].item() for j in pos), default=float("inf"))
        kept_pos = [-alpha * (s[i, j] - base) for j in pos if s[i, j].item() - epsilon < hardest_neg]
        kept_neg = [beta * (s[i, j] - base) for j in neg if s[i, j].item() + epsilon > easiest_pos]
        total = total + _lse1p(kept_pos) / alpha + _lse1p(kept_neg) / beta
    return total / n


def soft_neighbour_oracle(z: torch.Tensor, y: torch.Tensor, temperature: float, per_positive: bool):
    """SNCA (or SupCon with `per_positive`) over the anchors with a positive (mean over them)."""
    a = F.normalize(z, dim=1) @ F.normalize(z, dim=1).T / temperature
    n, total, valid = len(y), 0.0, 0
    for i in range(n):
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        if not pos:
            continue
        others = torch.stack([a[i, j] for j in range(n) if j != i])
        pull = torch.stack([a[i, j] for j in pos])
        pull = pull.mean() if per_positive else torch.logsumexp(pull, 0)
        total, valid = total - pull + torch.logsumexp(others, 0), valid + 1
    return total / max(valid, 1)


def extreme_cases():
    """(label, loss name, params, z, y, oracle) with an empty kept set and huge exponents."""
    z4 = torch.tensor([[1.0, 0.0], [0.999, 0.0447], [0.75, 0.66], [0.75, -0.66]])
    y4 = torch.tensor([0, 0, 1, 1])
    gen = torch.Generator().manual_seed(2)
    z7 = torch.randn(7, 5, generator=gen)
    y7 = torch.tensor([0, 0, 0, 1, 1, 2, 3])  # anchors 5 and 6 have no positive
    return [
        ("ms beta=1000, no kept negative", "multi_similarity", {"beta": 1000.0}, z4, y4,
         lambda z: multi_similarity_oracle(z, y4, beta=1000.0)),
        ("ms alpha=1000", "multi_similarity", {"alpha": 1000.0}, z4, y4,
         lambda z: multi_similarity_oracle(z, y4, alpha=1000.0)),
        ("ms beta=1000 alpha=1000 random", "multi_similarity", {"alpha": 1000.0, "beta": 1000.0}, z7, y7,
         lambda z: multi_similarity_oracle(z, y7, alpha=1000.0, beta=1000.0)),
        ("snca temperature=0.002", "snca", {"temperature": 0.002}, z7, y7,
         lambda z: soft_neighbour_oracle(z, y7, 0.002, per_positive=False)),
        ("supcon temperature=0.002", "supcon", {"temperature": 0.002}, z7, y7,
         lambda z: soft_neighbour_oracle(z, y7, 0.002, per_positive=True)),
    ]


# fp32 pair values of unit vectors are off by a few units of 2^-24 (normalisation and a short dot);
# an exponent scale k (beta, alpha, 1/temperature) multiplies that, and MS divides it back by k.
PAIR_VALUE_ERROR = 16 * 2.0 ** -24


def exponent_scale(params: dict) -> float:
    """The largest factor k multiplying a pair value inside an exponent (alpha, beta or 1/temperature)."""
    if "temperature" in params:
        return 1.0 / params["temperature"]
    return max(params.get("alpha", 2.0), params.get("beta", 50.0))


def loss_tolerance(params: dict) -> float:
    """Absolute error bound of the fp32 loss against the float64 oracle: two log-sum-exps, each off by
    k·ΔV (divided back by k for MS, whose terms carry 1/alpha, 1/beta)."""
    k = 1.0 if "temperature" not in params else exponent_scale(params)
    return 2.0 * PAIR_VALUE_ERROR * k + 1e-6


def grad_tolerance(params: dict, scale: float) -> float:
    """Gradient error bound: the softmax weights are off by a relative 2k·ΔV, plus fp32 sums."""
    return scale * (2.0 * PAIR_VALUE_ERROR * exponent_scale(params) + 1e-5)


def check_extreme(backend: str) -> list[str]:
    """Every extreme case on `backend` against its oracle: finite loss within `loss_tolerance`,
    gradient within `grad_tolerance`. Returns the failures."""
    failures = []
    for label, name, params, z, y, oracle in extreme_cases():
        zd = z.double().requires_grad_()
        want = oracle(zd)
        want.backward()
        zz = z.clone().requires_grad_()
        got = build_loss(name, backend=backend, **params)(zz, y)
        got.backward()
        err = abs(got.item() - want.item())
        if not torch.isfinite(got) or err > loss_tolerance(params):
            failures.append(f"{label}: loss {got.item()} vs float64 {want.item()}")
            continue
        grad_err = (zz.grad.double() - zd.grad).abs().max().item()
        scale = max(zd.grad.abs().max().item(), 1e-3)
        if not torch.isfinite(zz.grad).all() or grad_err > grad_tolerance(params, scale):
            failures.append(f"{label}: gradient error {grad_err} vs scale {scale}")
    return failures


def check_wide_labels(backend: str) -> list[str]:
    """Labels equal mod 2^32 stay distinct classes: every pairwise loss with labels [0, 0, 1, 1, 2^32,
    2^32, 2^32 + 1, 2^32 + 1] equals the same loss with labels 0..3 (and differs from the merged ones)."""
    from losses_helpers import PAIRWISE_CASES, run_loss

    gen = torch.Generator().manual_seed(7)
    z = torch.randn(8, 6, generator=gen)
    wide = torch.tensor([0, 0, 1, 1, 2 ** 32, 2 ** 32, 2 ** 32 + 1, 2 ** 32 + 1])
    failures = []
    for name, params in PAIRWISE_CASES:
        got = run_loss(name, params, backend, z, wide)[0].item()
        want = run_loss(name, params, "reference", z, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))[0].item()
        merged = run_loss(name, params, "reference", z, torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]))[0].item()
        if abs(got - want) > 1e-5 * max(1.0, abs(want)):
            failures.append(f"{name} {params}: {got} vs {want} (merged classes give {merged})")
    return failures
