"""Cross-entropy loss: torch oracle, the paper's smoothing convention, head options, terms."""
import math

import pytest
import torch
import torch.nn.functional as F

from unidml.losses import build_loss


def _ce(**params):
    params.setdefault("num_classes", 5)
    params.setdefault("embedding_dim", 8)
    return build_loss("cross_entropy", **params)


def test_zero_init_gives_log_k_and_zero_head():
    loss = _ce()
    assert torch.count_nonzero(loss.head.weight) == 0 and torch.count_nonzero(loss.head.bias) == 0
    value = loss(torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0]))
    assert value.item() == pytest.approx(math.log(5), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_matches_torch_with_converted_smoothing(eps):
    torch.manual_seed(0)
    loss = _ce(label_smoothing=eps, zero_init=False, dropout=0.0)
    z, y = torch.randn(7, 8, requires_grad=True), torch.randint(0, 5, (7,))
    ours = loss(z, y)
    # torch puts α/K on every class; ε/(K-1) off the true class is α = εK/(K-1).
    ref = F.cross_entropy(loss.logits(z), y, label_smoothing=eps * 5 / 4)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    g1, = torch.autograd.grad(ours, z)
    g2, = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_smoothed_targets_and_terms_sum():
    torch.manual_seed(1)
    loss = _ce(label_smoothing=0.2, zero_init=False, dropout=0.0)
    z, y = torch.randn(4, 8), torch.tensor([1, 1, 3, 0])
    value = loss(z, y)
    logits = loss.logits(z)
    q = torch.full((4, 5), 0.05)
    q[torch.arange(4), y] = 0.8
    assert loss.terms["tightness"].item() == pytest.approx(-(q * logits).sum(1).mean().item(), rel=1e-6)
    assert loss.terms["contrast"].item() == pytest.approx(torch.logsumexp(logits, 1).mean().item(), rel=1e-6)
    assert value.item() == pytest.approx((loss.terms["tightness"] + loss.terms["contrast"]).item(), rel=1e-6)
    assert not loss.terms["tightness"].requires_grad


def test_normalized_head_with_temperature():
    torch.manual_seed(2)
    loss = _ce(normalized=True, zero_init=False, temperature=0.05, bias=False, dropout=0.0)
    z = torch.randn(3, 8) * 10
    expected = F.normalize(z, dim=1) @ F.normalize(loss.head.weight, dim=1).T / 0.05
    torch.testing.assert_close(loss.logits(z), expected)
    assert loss.head.bias is None


def test_dropout_only_in_training_and_not_in_logits():
    torch.manual_seed(3)
    loss = _ce(zero_init=False, dropout=0.5, label_smoothing=0.0)
    z, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    expected = z @ loss.head.weight.T + loss.head.bias  # the linear head, computed here without dropout
    loss.train()
    a, b = loss(z, y), loss(z, y)
    assert a.item() != b.item()
    loss.eval()
    assert loss(z, y).item() == pytest.approx(F.cross_entropy(expected, y).item(), rel=1e-6)
    loss.train()
    # logits() never drops out: equal to the direct product in training mode too (same fp32 GEMM shape,
    # but possibly another kernel: 1e-6 relative covers a few roundings of 8-term dot products)
    torch.testing.assert_close(loss.logits(z), expected, rtol=1e-6, atol=1e-6)


def test_bf16_under_autocast_computes_fp32():
    torch.manual_seed(4)
    loss = _ce(zero_init=False, dropout=0.0, label_smoothing=0.0)
    z, y = torch.randn(5, 8).bfloat16(), torch.randint(0, 5, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(z, y)
    assert value.dtype == torch.float32
    ref = F.cross_entropy(z.float() @ loss.head.weight.T + loss.head.bias, y)
    assert value.item() == pytest.approx(ref.item(), rel=1e-6)


def test_single_class_and_single_sample_are_defined():
    loss = build_loss("cross_entropy", num_classes=1, embedding_dim=3, zero_init=False)
    assert loss(torch.randn(1, 3), torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("params, message", [
    ({"normalized": True}, "zero_init=False"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"temperature": 0.0}, "temperature"),
])
def test_bad_parameters_raise(params, message):
    with pytest.raises(ValueError, match=message):
        _ce(**params)


def test_bad_labels_raise():
    loss = _ce()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        loss(torch.randn(2, 8), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="integer"):
        loss(torch.randn(2, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="reference"):
        loss(torch.randn(2, 8), torch.tensor([0, 1]), ref_emb=torch.randn(2, 8), ref_labels=torch.tensor([0, 1]))
