"""PCE through class means, and the majorize-minimize inequalities of docs/design.md ("Losses") / docs/theory.md.

Only the provable statements are checked; the global "CE >= PCE for every φ and λ" is false and is
shown false here (never asserted).
"""
import math

import pytest
import torch

from unidml.losses import build_loss
from unidml.losses.pce import pce_terms


def _case(seed, n=30, d=6, k=4, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, k, (n,), generator=g)
    return z, y, k


def _ce(phi, z, y):
    """CE(φ) = -(1/n) Σ_i log softmax(φ z_i)_{y_i} (no bias, hard labels)."""
    return torch.nn.functional.cross_entropy(z @ phi.T, y)


def _means(z, y, k, phi):
    n = z.shape[0]
    onehot = torch.nn.functional.one_hot(y, k).to(z.dtype)
    p = torch.softmax(z @ phi.T, dim=1)
    return onehot.T @ z / n, p.T @ z / n  # hard c_k, soft c^s_k


def _curvature(z):
    return 0.5 * torch.linalg.eigvalsh(z.T @ z / z.shape[0]).max().item()


def test_pce_factorisation_equals_pairwise_formula():
    z, y, k = _case(0)
    n, lam = z.shape[0], 0.7
    p = torch.softmax(z @ torch.randn(k, z.shape[1], dtype=z.dtype).T, dim=1)
    gram = z @ z.T
    same = (y[:, None] == y[None, :]).to(z.dtype)
    tight = -(gram * same).sum() / (2 * lam * n * n)
    soft = p.T @ z / n
    inner = (gram @ p) / (lam * n) - (soft * soft).sum(1)[None, :] / (2 * lam)
    contrast = torch.logsumexp(inner, dim=1).mean()
    t, c = pce_terms(z, y, z, y, p, lam)
    assert t.item() == pytest.approx(tight.item(), rel=1e-12)
    assert c.item() == pytest.approx(contrast.item(), rel=1e-12)


def test_module_uses_its_head_and_reports_terms():
    torch.manual_seed(0)
    loss = build_loss("pce", num_classes=4, embedding_dim=6, lam=0.5, zero_init=False, normalize=False)
    z, y, _ = _case(1)
    value = loss(z.float(), y)
    p = torch.softmax(z.float() @ loss.head.weight.T, dim=1)
    t, c = pce_terms(z.float(), y, z.float(), y, p, 0.5)
    assert value.item() == pytest.approx((t + c).item(), rel=1e-6)
    assert loss.terms["tightness"].item() == pytest.approx(t.item(), rel=1e-6)
    value.backward()
    assert loss.head.weight.grad is not None and torch.isfinite(loss.head.weight.grad).all()


@pytest.mark.parametrize("seed", range(5))
def test_gradient_of_ce_is_soft_minus_hard_means(seed):
    z, y, k = _case(seed)
    phi = torch.randn(k, z.shape[1], dtype=z.dtype, requires_grad=True)
    grad, = torch.autograd.grad(_ce(phi, z, y), phi)
    hard, soft = _means(z, y, k, phi.detach())
    torch.testing.assert_close(grad, soft - hard, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_quadratic_majorizer_holds_for_lambda_at_least_l(seed):
    z, y, k = _case(seed, scale=1.0 + seed % 4)
    big_l = _curvature(z)
    g = torch.Generator().manual_seed(seed + 1000)
    for factor in (1.0, 1.5, 10.0):
        lam = factor * big_l
        for step in (0.1, 1.0, 10.0):
            phi_t = torch.randn(k, z.shape[1], generator=g, dtype=z.dtype)
            phi = phi_t + step * torch.randn(k, z.shape[1], generator=g, dtype=z.dtype)
            hard, soft = _means(z, y, k, phi_t)
            grad = soft - hard
            bound = _ce(phi_t, z, y) + (grad * (phi - phi_t)).sum() + lam / 2 * ((phi - phi_t) ** 2).sum()
            assert _ce(phi, z, y) <= bound + 1e-12


def test_majorizer_is_not_vacuous_without_curvature():
    # λ = 0 leaves the tangent plane, which lies BELOW the convex CE: the inequality must fail.
    z, y, k = _case(3)
    phi_t = torch.zeros(k, z.shape[1], dtype=z.dtype)
    phi = torch.randn(k, z.shape[1], dtype=z.dtype, generator=torch.Generator().manual_seed(0))
    hard, soft = _means(z, y, k, phi_t)
    tangent = _ce(phi_t, z, y) + ((soft - hard) * phi).sum()
    assert _ce(phi, z, y) > tangent


@pytest.mark.parametrize("seed", range(20))
def test_mm_step_decreases_ce_by_the_tightness_gap(seed):
    z, y, k = _case(seed, scale=0.5 + seed % 3)
    lam = _curvature(z) * (1.0 + seed % 3)
    phi_t = torch.randn(k, z.shape[1], dtype=z.dtype, generator=torch.Generator().manual_seed(seed))
    hard, soft = _means(z, y, k, phi_t)
    phi_next = phi_t - (soft - hard) / lam
    decrease = ((hard - soft) ** 2).sum() / (2 * lam)
    assert _ce(phi_next, z, y) <= _ce(phi_t, z, y) - decrease + 1e-12


@pytest.mark.parametrize("seed", range(20))
def test_tightness_bound_and_its_equality_point(seed):
    z, y, k = _case(seed)
    n, lam = z.shape[0], 0.1 + seed * 0.3
    same = (y[:, None] == y[None, :]).to(z.dtype)
    pairwise = -(z @ z.T * same).sum() / (2 * lam * n * n)
    hard, _ = _means(z, y, k, torch.zeros(k, z.shape[1], dtype=z.dtype))
    # The pairwise tightness term is PCE's tightness.
    t, _ = pce_terms(z, y, z, y, torch.full((n, k), 1.0 / k, dtype=z.dtype), lam)
    assert t.item() == pytest.approx(pairwise.item(), rel=1e-12)
    phi = torch.randn(k, z.shape[1], dtype=z.dtype, generator=torch.Generator().manual_seed(seed))
    lhs = -(phi[y] * z).sum(1).mean()
    assert lhs >= -lam / 2 * (phi ** 2).sum() + pairwise - 1e-12
    at = hard / lam
    lhs_at = -(at[y] * z).sum(1).mean()
    assert lhs_at.item() == pytest.approx((-lam / 2 * (at ** 2).sum() + pairwise).item(), rel=1e-10)


def test_global_ce_ge_pce_is_false():
    # As λ grows PCE tends to log K, while a fitted classifier reaches CE well below log K.
    z, y, k = _case(7, n=40)
    z = z + 3.0 * torch.nn.functional.one_hot(y, z.shape[1]).to(z.dtype)  # separable classes
    phi = torch.zeros(k, z.shape[1], dtype=z.dtype)
    for _ in range(200):
        hard, soft = _means(z, y, k, phi)
        phi = phi - (soft - hard) / _curvature(z)
    t, c = pce_terms(z, y, z, y, torch.softmax(z @ phi.T, dim=1), 1e6)
    assert (t + c).item() == pytest.approx(math.log(k), abs=1e-3)
    assert _ce(phi, z, y).item() < math.log(k) - 0.5


def test_the_training_form_is_bounded_below_where_the_raw_form_is_not():
    """Scaling the embeddings drives raw PCE to -inf (quadratically in the scale, with a still uninformative
    zero-initialised classifier); on unit-norm embeddings it stays above log K - (1 + 3/K)/(2λ) (docs/theory.md)."""
    z, y, k = _case(2, n=40, d=6, k=4)
    means = torch.randn(k, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    spread = z * 0.1 + (means - means.mean(0))[y]  # class means spread around a zero overall mean
    lam = 0.5
    raw = build_loss("pce", num_classes=k, embedding_dim=6, lam=lam, normalize=False)
    bounded = build_loss("pce", num_classes=k, embedding_dim=6, lam=lam)
    raw_values = [raw(spread * s, y).item() for s in (1.0, 10.0, 100.0)]
    assert raw_values[0] > raw_values[1] > raw_values[2] and raw_values[2] < -100.0
    floor = math.log(k) - (1 + 3 / k) / (2 * lam)
    for s in (1.0, 10.0, 100.0, 1e4):
        assert bounded(spread * s, y).item() >= floor
    # on unit-norm rows the two forms agree; the loss computes in fp32, values are O(1): a few ulps (1.2e-7) each
    unit = torch.nn.functional.normalize(spread, dim=1)
    assert bounded(unit, y).item() == pytest.approx(raw(unit, y).item(), rel=1e-6)

