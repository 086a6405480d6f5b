"""Fused classifier scores and the losses built on them: every backend equals the materialising reference.

Tolerances: fp32 everywhere, sums over at most a few dozen classes and features, so backends differ
only by summation order (a few ulps of the largest term); 1e-5 relative to the reference's scale
covers that with a wide margin and still catches any missing or misplaced term.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unidml.kernels.classifier.dispatch import class_scores
from unidml.kernels.classifier.head import ClassifierHead
from unidml.kernels.classifier.proxy_anchor import proxy_anchor_terms
from unidml.kernels.classifier.softmax import SoftmaxSpec, softmax_terms

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), f"{what}: infinite entries differ"
    scale = max(want[finite].abs().max().item() if finite.any() else 0.0, 1e-3)
    err = (got.float() - want.float())[finite].abs().max().item() if finite.any() else 0.0
    assert err <= rtol * scale, f"{what}: error {err} vs scale {scale}"


def _case(n, d, c, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, d, generator=gen), torch.randn(c, d, generator=gen)
    b = torch.randn(c, generator=gen) if bias else None
    targets = torch.randint(-1, c, (n,), generator=gen)
    return x, w, b, targets


def _scores_and_grads(backend, x, w, b, targets, **kw):
    """The four outputs and the gradients of a random linear functional of all of them."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = class_scores(leaves[0], leaves[1], leaves[2], targets, backend=backend, **kw)
    gen = torch.Generator().manual_seed(99)
    total = sum((torch.where(torch.isfinite(o), o, 0.0) * torch.randn(o.shape, generator=gen)).sum()
                for o in out if o.numel())
    total.backward()
    return list(out), [t.grad for t in leaves if t is not None]


SCORE_CASES = [  # (n, d, C, chunk, scale, normalize, rows, columns, bias)
    (13, 6, 7, 3, 1.0, False, True, True, True),
    (13, 6, 33, 5, 3.0, True, True, True, False),
    (9, 5, 1, 4, 2.0, False, True, True, True),  # one class: every row's only class is its target
    (16, 8, 20, 16, 0.5, True, True, False, True),
    (5, 4, 11, 64, 1.0, False, True, True, False),  # one chunk larger than C
    (12, 6, 17, 5, 8.0, True, False, True, False),  # columns only (Proxy-Anchor)
]


@pytest.mark.parametrize("case", SCORE_CASES)
def test_tiled_scores_match_reference(case):
    n, d, c, chunk, scale, normalize, rows, columns, bias = case
    x, w, b, targets = _case(n, d, c, seed=c, bias=bias)
    kw = dict(scale=scale, normalize=normalize, rows=rows, columns=columns)
    want = _scores_and_grads("reference", x, w, b, targets, **kw)
    got = _scores_and_grads("tiled", x, w, b, targets, chunk=chunk, **kw)
    for name, g, r in zip(("row_lse", "target", "col_lse", "weight_sum"), got[0], want[0]):
        _close(g, r, name)
    for name, g, r in zip(("dx", "dw", "dbias"), got[1], want[1]):
        _close(g, r, name)


def test_scores_non_contiguous_inputs_and_all_targets_elsewhere():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 18, generator=gen)[:, ::3]  # strided rows and columns
    w = torch.randn(10, 30, generator=gen).T[:6].T  # (10, 6), column-major
    assert not x.is_contiguous() and not w.is_contiguous()
    for targets in (torch.randint(0, 10, (12,), generator=gen), torch.full((12,), -1)):
        want = _scores_and_grads("reference", x, w, None, targets, scale=2.0, normalize=True, columns=True)
        got = _scores_and_grads("tiled", x, w, None, targets, chunk=3, scale=2.0, normalize=True, columns=True)
        for g, r in zip(got[0] + got[1], want[0] + want[1]):
            _close(g, r, "non-contiguous")


def test_reference_scores_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]])
    out = class_scores(x, w, None, torch.tensor([1, -1]), backend="reference", columns=True)
    logits = x @ w.T  # [[1, 2, 0], [2, 0, -2]]
    want_rows = torch.stack([torch.tensor(math.log(math.e + 1)), torch.logsumexp(logits[1], 0)])
    torch.testing.assert_close(out.row_lse, want_rows)
    torch.testing.assert_close(out.target, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out.col_lse, torch.stack([torch.logsumexp(logits[:, 0], 0), logits[1, 1],
                                                         torch.logsumexp(logits[:, 2], 0)]))
    torch.testing.assert_close(out.weight_sum, torch.tensor([3.0, 0.0]))


# ------------------------------------------------------------------- losses on the fused scores

SOFTMAX_CASES = [  # (C, bias, spec)
    (9, True, SoftmaxSpec(scale=2.0, label_smoothing=0.1)),
    (13, False, SoftmaxSpec(scale=16.0, normalized=True, label_smoothing=0.2)),
    (13, False, SoftmaxSpec(scale=30.0, normalized=True, margin_kind="cosface", margin=0.35)),
    (13, False, SoftmaxSpec(scale=30.0, normalized=True, margin_kind="arcface", margin=0.5, label_smoothing=0.1)),
    (1, True, SoftmaxSpec(label_smoothing=0.1)),  # one class: loss 0, gradient 0
]


def _head(c, d, bias, seed):
    torch.manual_seed(seed)
    head = ClassifierHead(c, d, bias=bias, init=torch.nn.init.normal_)
    if bias:
        with torch.no_grad():
            head.bias.normal_()
    return head


def _loss_and_grads(terms_fn, head, z, y):
    zz = z.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    tight, contrast = terms_fn(zz)
    (tight + contrast).backward()
    grads = [zz.grad] + [p.grad.clone() for p in head.parameters()]
    return torch.stack([tight.detach(), contrast.detach()]), grads


def _materialised_softmax(head, z, y, spec):
    """Independent oracle: full logits, the margin written into the target column, torch CE."""
    x = F.normalize(z, dim=1) if spec.normalized else z
    w = F.normalize(head.weight, dim=1) if spec.normalized else head.weight
    cos = x @ w.T
    onehot = F.one_hot(y, head.num_classes).bool()
    if spec.margin_kind == "cosface":
        cos = torch.where(onehot, cos - spec.margin, cos)
    elif spec.margin_kind == "arcface":
        cos = torch.where(onehot, torch.cos(torch.acos(cos.clamp(-1, 1)) + spec.margin), cos)
    logits = spec.scale * (cos if head.bias is None else cos + head.bias)
    c = head.num_classes
    smoothing = spec.label_smoothing * c / (c - 1) if c > 1 else 0.0  # torch spreads α/C over all classes
    return F.cross_entropy(logits, y, label_smoothing=smoothing)


@pytest.mark.parametrize("case", SOFTMAX_CASES)
def test_softmax_terms_every_backend(case):
    c, bias, spec = case
    head = _head(c, 6, bias, seed=c)
    gen = torch.Generator().manual_seed(1)
    z, y = torch.randn(14, 6, generator=gen), torch.randint(0, c, (14,), generator=gen)
    runs = {be: _loss_and_grads(lambda zz: softmax_terms(head, zz, y, spec, be, chunk=4), head, z, y)
            for be in ("reference", "tiled")}
    zz = z.clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    oracle = _materialised_softmax(head, zz, y, spec)
    oracle.backward()
    oracle_grads = [zz.grad] + [p.grad for p in head.parameters()]
    for be, (terms, grads) in runs.items():
        _close(terms.sum(), oracle.detach(), f"{be} loss")
        for g, r in zip(grads, oracle_grads):
            _close(g, r, f"{be} grad")
        _close(terms, runs["reference"][0], f"{be} terms")
    if c == 1:
        assert runs["tiled"][0].sum().abs().item() < 1e-6


def test_proxy_anchor_terms_every_backend_match_pml():
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    head = _head(11, 6, False, seed=3)
    gen = torch.Generator().manual_seed(2)
    z, y = torch.randn(15, 6, generator=gen), torch.randint(0, 5, (15,), generator=gen)  # classes 5..10 absent
    pml = ProxyAnchorLoss(11, 6)
    with torch.no_grad():
        pml.proxies.copy_(head.weight)
    zz = z.clone().requires_grad_()
    want = pml(zz, y)
    want.backward()
    for be in ("reference", "tiled"):
        terms, grads = _loss_and_grads(lambda q: proxy_anchor_terms(head, q, y, 32.0, 0.1, be, chunk=4), head, z, y)
        _close(terms.sum(), want.detach(), f"{be} loss")
        _close(grads[0], zz.grad, f"{be} dz")
        _close(grads[1], pml.proxies.grad, f"{be} dproxies")


# ----------------------------------------------------------------------------- Triton (interpreter)

def triton_check() -> None:
    """Triton scores and losses equal the reference; run under TRITON_INTERPRET=1 (see the test below)."""
    for case in SCORE_CASES:
        n, d, c, _chunk, scale, normalize, rows, columns, bias = case
        x, w, b, targets = _case(n, d, c, seed=c, bias=bias)
        kw = dict(scale=scale, normalize=normalize, rows=rows, columns=columns)
        want = _scores_and_grads("reference", x, w, b, targets, **kw)
        got = _scores_and_grads("triton", x, w, b, targets, **kw)
        for g, r in zip(got[0] + got[1], want[0] + want[1]):
            _close(g, r, f"triton {case}")
    x, w, b, targets = _case(21, 24, 37, seed=7)  # several row, class and feature tiles
    want = _scores_and_grads("reference", x[:, ::2], w[:, ::2], b, targets, scale=2.0, columns=True)
    got = _scores_and_grads("triton", x[:, ::2], w[:, ::2], b, targets, scale=2.0, columns=True)
    for g, r in zip(got[0] + got[1], want[0] + want[1]):
        _close(g, r, "triton non-contiguous")
    gen = torch.Generator().manual_seed(1)
    for c, bias, spec in SOFTMAX_CASES:
        head = _head(c, 6, bias, seed=c)
        z, y = torch.randn(14, 6, generator=gen), torch.randint(0, c, (14,), generator=gen)
        runs = [_loss_and_grads(lambda zz: softmax_terms(head, zz, y, spec, be), head, z, y)
                for be in ("reference", "triton")]
        for g, r in zip([runs[1][0]] + runs[1][1], [runs[0][0]] + runs[0][1]):
            _close(g, r, f"triton softmax {spec}")
    head = _head(11, 6, False, seed=3)
    y = torch.randint(0, 5, (14,), generator=gen)
    runs = [_loss_and_grads(lambda q: proxy_anchor_terms(head, q, y, 32.0, 0.1, be), head, z, y)
            for be in ("reference", "triton")]
    for g, r in zip([runs[1][0]] + runs[1][1], [runs[0][0]] + runs[0][1]):
        _close(g, r, "triton proxy anchor")
    for dtype in (torch.bfloat16, torch.float16):  # half inputs, fp32 accumulation: same as fp32 on rounded values
        xh = x.to(dtype)
        want = _scores_and_grads("reference", xh.float(), w, b, targets, scale=2.0, normalize=True, columns=True)
        got = _scores_and_grads("triton", xh, w, b, targets, scale=2.0, normalize=True, columns=True)
        for g, r in zip(got[0] + got[1][1:], want[0] + want[1][1:]):
            _close(g, r, f"triton {dtype}")
        _close(got[1][0], want[1][0], f"triton {dtype} dx", rtol={torch.bfloat16: 2.0 ** -7,
                                                                    torch.float16: 2.0 ** -10}[dtype])


@pytest.mark.timeout(300)
def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    code = "import test_kernels_classifier as t; t.triton_check()"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
