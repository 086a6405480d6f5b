"""Shared helpers for the loss / kernel tests: random cases and backend-vs-reference comparison."""
from __future__ import annotations

import torch

from unidml.kernels import build_loss

# (name, params) covering every pairwise loss, mining, metric and reduction.
PAIRWISE_CASES = [
    ("contrastive", {}),
    ("contrastive", {"pos_margin": 0.2, "neg_margin": 0.9, "power": 2, "reduction": "mean"}),
    ("contrastive", {"distance": "cosine", "pos_margin": 0.8, "neg_margin": 0.3, "reduction": "per_anchor"}),
    ("contrastive", {"normalize": False, "neg_margin": 5.0}),
    ("contrastive", {"neg_margin": 0.4, "pos_margin": 0.1}),  # few active negatives: sparse backward
    ("contrastive", {"distance": "cosine", "neg_margin": 0.9, "power": 2}),
    ("triplet", {"margin": 0.2}),
    ("triplet", {"margin": 0.2, "mining": "semi_hard"}),
    ("triplet", {"margin": 0.3, "mining": "batch_hard"}),
    ("triplet", {"margin": 0.1, "mining": "batch_hard", "distance": "cosine"}),
    ("triplet", {"margin": 0.2, "mining": "all", "distance": "cosine"}),
    ("multi_similarity", {}),
    ("multi_similarity", {"alpha": 1.0, "beta": 20.0, "base": 0.3, "epsilon": 0.3}),
    ("snca", {}),
    ("snca", {"temperature": 0.5}),
    ("supcon", {}),
]


def random_case(n: int, d: int, classes: int, seed: int, dtype=torch.float32):
    """Embeddings (n, d) and labels (n,) from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen).to(dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return z, y


def run_loss(name: str, params: dict, backend: str, z: torch.Tensor, y: torch.Tensor,
             ref=None, chunk_rows=None):
    """(loss, grad wrt z, grad wrt ref or None, terms) of one forward/backward."""
    extra = {"chunk_rows": chunk_rows} if chunk_rows else {}
    loss = build_loss(name, backend=backend, **params, **extra)
    zz = z.detach().clone().requires_grad_()
    rr = None if ref is None else ref[0].detach().clone().requires_grad_()
    value = loss(zz, y, rr, None if ref is None else ref[1])
    value.backward()
    return value.detach(), zz.grad, None if rr is None else rr.grad, loss.terms


# Gradients come back in the input dtype: one rounding of that dtype, relative to the gradient scale.
HALF_GRAD_RTOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def assert_same(got, want, rtol: float, what: str, grad_rtol: float | None = None) -> None:
    """Loss within rtol relative; gradients within grad_rtol (default rtol) of the reference scale."""
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    assert torch.isfinite(got[0]), f"{what}: loss not finite"
    assert abs(got[0].item() - want[0].item()) <= rtol * max(1.0, abs(want[0].item())), \
        f"{what}: loss {got[0].item()} vs {want[0].item()}"
    for g, w in zip(got[1:3], want[1:3]):
        if w is None:
            continue
        assert torch.isfinite(g).all(), f"{what}: gradient not finite"
        scale = max(w.abs().max().item(), 1e-3)  # floor: an exactly-zero reference gradient
        err = (g.float() - w.float()).abs().max().item()
        assert err <= grad_rtol * scale, f"{what}: gradient error {err} vs scale {scale}"
    for key in ("tightness", "contrast"):
        t, u = got[3][key].item(), want[3][key].item()
        assert abs(t - u) <= rtol * max(1.0, abs(u)), f"{what}: term {key} {t} vs {u}"


def edge_cases():
    """(label, z, y, ref) cases with degenerate structure; ref is (ref_z, ref_y) or None."""
    z, y = random_case(23, 9, 4, seed=11)
    tie = torch.cat([z[:6], z[:6]])  # exact duplicates: tied distances everywhere
    tie_y = torch.cat([y[:6], y[:6]])
    big = torch.randn(9, 30, generator=torch.Generator().manual_seed(3))
    ref_z, ref_y = random_case(17, 9, 4, seed=12)
    return [
        ("n=1", z[:1], y[:1], None),
        ("single class", z[:7], torch.zeros(7, dtype=torch.long), None),
        ("all singletons", z[:8], torch.arange(8), None),
        ("some rows without positive", z, torch.where(y == 0, torch.arange(23) + 10, y), None),
        ("ties", tie, tie_y, None),
        ("non-contiguous", big[:, ::3], torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 1]), None),
        ("references", z, y, (ref_z, ref_y)),
    ]


def triton_check(which: str) -> None:
    """Compare the Triton backend with the reference (run under TRITON_INTERPRET=1 in a subprocess).

    which: `random` (all kernel-backed cases on random inputs), `edge` (degenerate cases) or `half`
    (bf16 / fp16 kernel inputs against the fp32 reference on the same rounded values).
    """
    from unidml.kernels.pairwise.dispatch import triton_supports

    cases = [(n, p) for n, p in PAIRWISE_CASES
             if triton_supports(build_loss(n, backend="tiled", **p).spec)]
    failures = []

    def check(label, fn):
        try:
            fn()
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")

    for name, params in cases:
        if which == "random":
            z, y = random_case(37, 20, 4, seed=21)
            check(f"{name} {params}", lambda: assert_same(run_loss(name, params, "triton", z, y),
                                                          run_loss(name, params, "reference", z, y), 1e-5, name))
        elif which == "edge":
            for label, z, y, ref in edge_cases():
                check(f"{name} {params} {label}", lambda: _check_edge(name, params, z, y, ref, label))
        else:  # bf16 for every kernel, fp16 (same code path, other rounding) for the first one
            for dtype in (torch.bfloat16, torch.float16) if (name, params) == cases[0] else (torch.bfloat16,):
                check(f"{name} {params} {dtype}", lambda: _check_half(name, params, dtype))
    assert not failures, "\n".join(failures)


def _check_edge(name, params, z, y, ref, label):
    got = run_loss(name, params, "triton", z, y, ref)
    want = run_loss(name, params, "reference", z, y, ref)
    if label == "ties" and params.get("mining") == "batch_hard":
        # Tied hardest pairs may pick different duplicates: compare the loss and the gradient summed
        # over each duplicate pair (z[i] and z[i+6] are the same point).
        half = z.shape[0] // 2
        got = (got[0], got[1][:half] + got[1][half:], None, got[3])
        want = (want[0], want[1][:half] + want[1][half:], None, want[3])
    assert_same(got, want, 1e-5, f"{name} {label}")


def _check_half(name, params, dtype):
    """Kernel on half inputs vs the reference on the same values in fp32 (fixed upstream gradient)."""
    from unidml.kernels.pairwise.reference import reference_rows
    from unidml.kernels.pairwise.triton_backend import triton_rows

    spec = build_loss(name, backend="tiled", **params).spec
    z, y = random_case(35, 24, 4, seed=4)
    x = torch.nn.functional.normalize(z, dim=1).to(dtype)
    upstream = torch.rand(35, 2, generator=torch.Generator().manual_seed(0))
    results = []
    for fn, inp in ((triton_rows, x), (reference_rows, x.float())):
        xx = inp.detach().clone().requires_grad_()
        sums, counts = fn(spec, xx, xx, y, y, 0)
        (sums * upstream).sum().backward()
        results.append((sums.detach(), counts, xx.grad.float()))
    (s1, c1, g1), (s2, c2, g2) = results
    assert torch.equal(c1, c2), f"{name} {dtype}: counts differ"
    assert (s1 - s2).abs().max() <= 1e-4 * max(1.0, s2.abs().max().item()), f"{name} {dtype}: sums differ"
    assert (g1 - g2).abs().max() <= 2.0 ** -6 * g2.abs().max(), f"{name} {dtype}: gradients differ"
