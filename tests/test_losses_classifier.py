"""Classifier and proxy losses equal pytorch-metric-learning (value and gradients) on every backend.

PML keeps its class weights as W (d, C) or proxies (C, d); ours are `head.weight` (C, d), copied in.
Tolerance 1e-5 relative (fp32; the same sums in another order, see tests/test_kernels_classifier.py).
"""
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml

from unidml.losses import build_loss

N, DIM, CLASSES = 18, 8, 13
BACKENDS = ("reference", "tiled")
CASES = [  # (our name, our params, PML class, PML params, PML weight attribute)
    ("normalized_softmax", {}, pml.NormalizedSoftmaxLoss, {}, "W"),
    ("normalized_softmax", {"temperature": 0.2}, pml.NormalizedSoftmaxLoss, {"temperature": 0.2}, "W"),
    ("arcface", {}, pml.ArcFaceLoss, {}, "W"),
    ("arcface", {"margin": 10.0, "scale": 16.0}, pml.ArcFaceLoss, {"margin": 10.0, "scale": 16.0}, "W"),
    ("cosface", {}, pml.CosFaceLoss, {}, "W"),
    ("cosface", {"margin": 0.2, "scale": 30.0}, pml.CosFaceLoss, {"margin": 0.2, "scale": 30.0}, "W"),
    ("proxy_nca", {}, pml.ProxyNCALoss, {}, "proxies"),
    ("proxy_nca", {"softmax_scale": 9.0}, pml.ProxyNCALoss, {"softmax_scale": 9.0}, "proxies"),
    ("proxy_anchor", {}, pml.ProxyAnchorLoss, {}, "proxies"),
    ("proxy_anchor", {"margin": 0.2, "alpha": 16.0}, pml.ProxyAnchorLoss, {"margin": 0.2, "alpha": 16.0}, "proxies"),
]


def _batch(seed=0, classes=CLASSES):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, DIM, generator=gen), torch.randint(0, classes, (N,), generator=gen)


def _close(got, want, what):
    scale = max(want.abs().max().item(), 1e-3)
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * scale, f"{what}: error {err} vs scale {scale}"


def _value_and_grads(loss, weight, z, y):
    zz = z.clone().requires_grad_()
    value = loss(zz, y)
    value.backward()
    return value.detach(), zz.grad, weight.grad


@pytest.mark.parametrize("name, params, pml_cls, pml_params, attr", CASES)
def test_matches_pytorch_metric_learning(name, params, pml_cls, pml_params, attr):
    z, y = _batch()
    theirs = pml_cls(num_classes=CLASSES, embedding_size=DIM, **pml_params)
    weight = getattr(theirs, attr)
    want = _value_and_grads(theirs, weight, z, y)
    for backend in BACKENDS:
        ours = build_loss(name, num_classes=CLASSES, embedding_dim=DIM, backend=backend, chunk_classes=5, **params)
        with torch.no_grad():
            ours.head.weight.copy_(weight.T if attr == "W" else weight)
        value, dz, dw = _value_and_grads(ours, ours.head.weight, z, y)
        _close(value, want[0], f"{name} {backend} loss")
        _close(dz, want[1], f"{name} {backend} d embeddings")
        _close(dw, want[2].T if attr == "W" else want[2], f"{name} {backend} d weights")
        terms = ours.terms
        _close(terms["tightness"] + terms["contrast"], value, f"{name} terms add up")


def test_proxy_anchor_terms_are_its_positive_and_negative_parts():
    z, y = _batch(1, classes=4)
    loss = build_loss("proxy_anchor", num_classes=6, embedding_dim=DIM, backend="tiled")
    loss(z, y)
    s = F.normalize(z) @ F.normalize(loss.head.weight.detach()).T
    onehot = F.one_hot(y, 6).bool()
    pos = torch.stack([torch.log1p(torch.exp(-32 * (s[onehot[:, p], p] - 0.1)).sum()) for p in range(4)]).mean()
    neg = torch.stack([torch.log1p(torch.exp(32 * (s[~onehot[:, p], p] + 0.1)).sum()) for p in range(6)]).mean()
    _close(loss.terms["tightness"], pos, "positive part")
    _close(loss.terms["contrast"], neg, "negative part")


def test_proxy_initialisations_follow_pml():
    torch.manual_seed(0)
    anchor = build_loss("proxy_anchor", num_classes=500, embedding_dim=64)
    assert anchor.head.weight.std().item() == pytest.approx((2 / 500) ** 0.5, rel=0.05)  # Kaiming normal, fan-out
    assert anchor.proxies is anchor.head.weight
    with pytest.raises(ValueError, match="no reference"):
        anchor(torch.randn(2, 64), torch.tensor([0, 1]), ref_emb=torch.randn(2, 64), ref_labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("params", [
    {"label_smoothing": 0.1, "dropout": 0.0, "zero_init": False},
    {"normalized": True, "zero_init": False, "temperature": 0.1, "bias": False, "dropout": 0.0},
])
def test_cross_entropy_backends_agree_and_match_torch(params):
    z, y = _batch(2)
    results = []
    for backend in BACKENDS:
        torch.manual_seed(3)
        loss = build_loss("cross_entropy", num_classes=CLASSES, embedding_dim=DIM, backend=backend,
                          chunk_classes=4, **params)
        results.append(_value_and_grads(loss, loss.head.weight, z, y))
    eps = loss.label_smoothing
    ref = F.cross_entropy(loss.logits(z), y, label_smoothing=eps * CLASSES / (CLASSES - 1))
    _close(results[0][0], ref.detach(), "reference vs torch")
    for got, what in zip(results[1], ("loss", "dz", "dw")):
        _close(got, results[0][("loss", "dz", "dw").index(what)], f"tiled {what}")


def test_class_sampling_keeps_positives_is_seeded_and_off_in_eval():
    z, y = _batch(4, classes=5)
    params = dict(num_classes=40, embedding_dim=DIM, zero_init=False, dropout=0.0, label_smoothing=0.0)
    torch.manual_seed(0)
    sampled = build_loss("cross_entropy", sample_rate=0.25, sample_seed=7, **params)
    torch.manual_seed(0)
    full = build_loss("cross_entropy", **params)
    kept, cols = sampled.sampler.choose(40, y, rank=0)
    assert kept.numel() == 10 and set(y.tolist()) <= set(kept.tolist())
    assert torch.equal(kept[cols], y)  # each row's target column points at its class
    assert int(sampled.sampler.step) == 1
    again = build_loss("cross_entropy", sample_rate=0.25, sample_seed=7, **params)
    again.load_state_dict(sampled.state_dict())  # the step count travels with the checkpoint
    assert torch.equal(sampled.sampler.choose(40, y, rank=0)[0], again.sampler.choose(40, y, rank=0)[0])
    # Sampling drops negatives, so the training loss is at most the full one; eval mode uses every class.
    assert sampled(z, y).item() <= full(z, y).item() + 1e-6
    sampled.eval()
    _close(sampled(z, y).detach(), full(z, y).detach(), "eval mode is exact")
