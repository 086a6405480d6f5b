"""Fused classifier scores and the losses built on them: every backend equals the materialising reference.

Tolerances: fp32 everywhere, sums over at most a few dozen classes and features, so backends differ
only by summation order (a few ulps of the largest term); 1e-5 relative to the reference's scale
covers that with a wide margin and still catches any missing or misplaced term.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import assert_runs_interpreted

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

def test_compute_dtype_and_fp32_precision():
    """One compute dtype for both operands: the half one if any (bf16 for a bf16/fp16 mix), else fp32, whose
    products use TF32 exactly when PyTorch's fp32 matmuls may."""
    from unidml.kernels.classifier.common import compute_dtype, fp32_dot_precision

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = {(bf16, fp32): bf16, (fp32, bf16): bf16, (fp16, fp32): fp16, (fp32, fp16): fp16, (fp16, bf16): bf16,
             (bf16, fp16): bf16, (fp16, fp16): fp16, (fp32, fp32): fp32}
    assert {pair: compute_dtype(*pair) for pair in cases} == cases
    saved = torch.get_float32_matmul_precision()
    try:
        got = {}
        for mode in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(mode)
            got[mode] = fp32_dot_precision()
    finally:
        torch.set_float32_matmul_precision(saved)
    assert got == {"highest": "ieee", "high": "tf32", "medium": "tf32"}


@pytest.mark.parametrize("name", ["cross_entropy", "cosface", "proxy_anchor"])
def test_half_embeddings_reach_the_triton_kernels_unconverted(monkeypatch, name):
    """bf16 embeddings go to the fused kernels as bf16 (tensor cores), not upcast to fp32 on the way."""
    from unidml.kernels.classifier import proxy_anchor, softmax
    from unidml.losses import build_loss

    seen = []

    def spy(x, w, *args, **kwargs):
        seen.append(x.dtype)
        return class_scores(x.float(), w, *args, **{**kwargs, "backend": "reference"})

    monkeypatch.setattr(softmax, "class_scores", spy)
    monkeypatch.setattr(proxy_anchor, "class_scores", spy)
    params = {"normalized": True, "zero_init": False} if name == "cross_entropy" else {}
    loss = build_loss(name, num_classes=5, embedding_dim=8, backend="tiled", **params)
    loss.backend = "triton"  # what `auto` resolves to on CUDA
    loss(torch.randn(4, 8).to(torch.bfloat16), torch.tensor([0, 1, 2, 1]))
    assert seen == [torch.bfloat16]


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
    mixed_dtype_check()
    offsets_check()


def offsets_check() -> None:
    """The kernels' row offsets (`_rows64`) are exact past 2^31, where an int32 product wraps: row 1,048,576 of
    a d = 2048 weight starts at element 2^31 (the 1.05 M-class case); the last entries pass 2^32."""
    from triton_offsets import row_offsets

    idx = torch.tensor([3, 1_048_575, 1_048_576, 2_500_000], dtype=torch.int32)
    out64, out32 = torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64)
    row_offsets[(1,)](idx, out64, out32, 2048)
    want = [i * 2048 for i in idx.tolist()]
    assert out64.tolist() == want, (out64.tolist(), want)
    assert out32.tolist()[2:] != want[2:]  # int32 wraps: the case the 64-bit offsets exist for


UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}  # unit roundoff
DTYPE_MIXES = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float16, torch.float16),
               (torch.float32, torch.float32)]
MIXED_SHAPES = [(21, 37, 37, True, False), (1, 20, 19, False, True), (18, 24, 35, True, True)]  # n, d, C, bias, norm


def _grad_magnitudes(x, w, b, targets, scale, normalize, g_row, g_col):
    """(|G|·|V|, |G|ᵀ·|X| / ‖w_k‖) in float64 from the materialised logits: the scale of the rounding of
    G = ∂L/∂(x·v) to the compute dtype before the backward's products."""
    x, w = x.double(), w.double()
    v = F.normalize(w, dim=1) if normalize else w
    logits = scale * (x @ v.T + (0.0 if b is None else b.double()[None, :]))
    keep = torch.ones_like(logits, dtype=torch.bool)
    has = targets >= 0
    keep[has.nonzero().squeeze(1), targets[has]] = False
    masked = logits.masked_fill(~keep, float("-inf"))
    g = (g_row.double()[:, None] * (masked - masked.logsumexp(1, keepdim=True)).exp()).abs()
    g = g + (g_col.double()[None, :] * (masked - masked.logsumexp(0, keepdim=True)).exp()).abs()
    g = torch.nan_to_num(g) * scale
    return g @ v.abs(), (g.T @ x.abs()) * (1.0 / w.norm(dim=1, keepdim=True) if normalize else 1.0)


def mixed_dtype_check() -> None:
    """The GPU code path on every mixture of bf16 / fp16 / fp32 embeddings and weights, d not a power of two,
    C off the block multiple, n = 1, against the reference backend on the same values in fp32.

    Inputs are drawn representable in every dtype involved, so casting them to the compute dtype is exact
    and the forward differs from fp32 only by summation order (RTOL). The backward rounds each tile of
    G = ∂L/∂(x·v) to the compute dtype (unit roundoff u) before its products: dX is off by at most
    u·(|G|·|V|) per entry and dW by u·‖(|G|ᵀ·|X|)_k‖/‖w_k‖ per row (the normalisation's projection does not
    grow a row's 2-norm), and each gradient is rounded once more to its input's dtype; the bound asserted
    is twice the sum of those plus RTOL of the largest entry (observed: at most 0.76 of it)."""
    from triton_interpreter import faithful_bf16_dot

    faithful_bf16_dot()
    gen = torch.Generator().manual_seed(11)
    for (n, d, c, bias, normalize) in MIXED_SHAPES:
        x0 = torch.randn(n, d, generator=gen).to(torch.bfloat16).to(torch.float16).float()  # exact in both
        w0 = torch.randn(c, d, generator=gen).to(torch.bfloat16).to(torch.float16).float()
        b = torch.randn(c, generator=gen) if bias else None
        targets = torch.randint(-1, c, (n,), generator=gen)
        kw = dict(scale=3.0, normalize=normalize, rows=True, columns=True)
        want_out, want_grads = _scores_and_grads("reference", x0, w0, b, targets, **kw)
        gen_up = torch.Generator().manual_seed(99)  # the upstream gradients _scores_and_grads draws
        ups = [torch.randn(o.shape, generator=gen_up) for o in want_out if o.numel()]
        bound_dx, bound_dw = _grad_magnitudes(x0, w0, b, targets, 3.0, normalize, ups[0], ups[2])
        for x_dtype, w_dtype in DTYPE_MIXES:
            what = f"triton {x_dtype}/{w_dtype} n={n} d={d} C={c}"
            got_out, got_grads = _scores_and_grads("triton", x0.to(x_dtype), w0.to(w_dtype), b, targets, **kw)
            assert got_grads[0].dtype == x_dtype and got_grads[1].dtype == w_dtype, what
            for name, g, r in zip(("row_lse", "target", "col_lse", "weight_sum"), got_out, want_out):
                _close(g, r, f"{what} {name}")
            u = UNIT[torch.bfloat16 if torch.bfloat16 in (x_dtype, w_dtype) else
                     torch.float16 if torch.float16 in (x_dtype, w_dtype) else torch.float32]
            err_dx = (got_grads[0].double() - want_grads[0].double()).abs()
            slack_dx = RTOL * want_grads[0].abs().max().item() + 2 * UNIT[x_dtype] * want_grads[0].abs().double()
            assert (err_dx <= 2 * u * bound_dx + slack_dx).all(), f"{what} dx: {err_dx.max()}"
            err_dw = (got_grads[1].double() - want_grads[1].double()).norm(dim=1)
            slack_dw = RTOL * want_grads[1].abs().max().item() + 2 * UNIT[w_dtype] * want_grads[1].double().norm(dim=1)
            assert (err_dw <= 2 * u * bound_dw.norm(dim=1) + slack_dw).all(), f"{what} dw: {err_dw.max()}"
            if bias:
                _close(got_grads[2], want_grads[2], f"{what} dbias")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    assert_runs_interpreted("import test_kernels_classifier as t; t.triton_check()", timeout=280)
