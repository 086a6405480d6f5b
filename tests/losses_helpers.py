"""Shared helpers for the loss / kernel tests: random cases and backend-vs-reference comparison."""
from __future__ import annotations

import torch

from unidml.losses import build_loss

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


def pair_counts(name: str, params: dict, backend: str, z: torch.Tensor, y: torch.Tensor, ref=None,
                chunk_rows=None) -> torch.Tensor:
    """Column totals (N_t, N_c) of the row counts: the active pairs (contrastive `mean_nonzero`), active
    triplets (triplet), anchors (the others). Integers, so backends must agree exactly."""
    from unidml.kernels.pairwise.dispatch import pairwise_rows

    loss = build_loss(name, backend=backend, **params)
    prep = (lambda t: torch.nn.functional.normalize(t.float(), dim=1)) if loss.normalize else (lambda t: t.float())
    x = prep(z)
    r, r_y, offset = (x, y, 0) if ref is None else (prep(ref[0]), ref[1], None)
    _, counts = pairwise_rows(loss.spec, x, r, y, r_y, offset, loss.backend, chunk_rows)
    return counts.sum(0)


def run_loss(name: str, params: dict, backend: str, z: torch.Tensor, y: torch.Tensor,
             ref=None, chunk_rows=None):
    """(loss, grad wrt z, grad wrt ref or None, terms) of one forward/backward."""
    extra = {"chunk_rows": chunk_rows} if chunk_rows else {}
    loss = build_loss(name, backend=backend, **params, **extra)
    zz = z.detach().clone().requires_grad_()
    rr = None if ref is None else ref[0].detach().clone().requires_grad_()
    value = loss(zz, y, ref_emb=rr, ref_labels=None if ref is None else ref[1])
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


def near_duplicates(n: int, d: int, classes: int, seed: int, scale: float = 10.0):
    """Each point three times: as is, exactly copied and moved by one ulp per coordinate, same label.

    With norms ~ scale·sqrt(d) the computed squared distance of a copy is rounding noise of either
    sign (up to ~ d·2⁻²⁴·|z|²), so whether its distance is 0 depends on the summation order unless
    the duplicate rule decides it. The true distances (≤ ~1e-5) lie far inside the rule's radius.
    """
    z, y = random_case(n, d, classes, seed)
    z = z * scale
    return torch.cat([z, z, torch.nextafter(z, torch.full_like(z, float("inf")))]), torch.cat([y, y, y])


def edge_cases():
    """(label, z, y, ref) cases with degenerate structure; ref is (ref_z, ref_y) or None."""
    z, y = random_case(23, 9, 4, seed=11)
    tie = torch.cat([z[:6], z[:6]])  # exact duplicates: tied distances everywhere
    tie_y = torch.cat([y[:6], y[:6]])
    big = torch.randn(9, 30, generator=torch.Generator().manual_seed(3))
    ref_z, ref_y = random_case(17, 9, 4, seed=12)
    near_z, near_y = near_duplicates(7, 9, 3, seed=13)
    other_y = torch.cat([y[:6], y[:6] + 4])  # the same six points, once more with labels 4..7
    return [
        ("n=1", z[:1], y[:1], None),
        ("single class", z[:7], torch.zeros(7, dtype=torch.long), None),
        ("all singletons", z[:8], torch.arange(8), None),
        ("some rows without positive", z, torch.where(y == 0, torch.arange(23) + 10, y), None),
        ("ties", tie, tie_y, None),
        ("near duplicates", near_z, near_y, None),
        ("duplicated references", near_z[:7], near_y[:7], (near_z, near_y)),
        ("duplicates across labels", tie, other_y, None),
        ("non-contiguous", big[:, ::3], torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 1]), None),
        ("references", z, y, (ref_z, ref_y)),
    ]


def triton_check(which: str) -> None:
    """Compare the Triton backend with the reference (run under TRITON_INTERPRET=1 in a subprocess).

    which: `random` (all kernel-backed cases on random inputs), `edge` (degenerate cases) or `mixed`
    (bf16 / fp16 / fp32 embeddings, references and memory banks in every combination, through the
    public loss API, on the GPU code path: half operands reach `tl.dot` as they are).
    """
    from triton_interpreter import faithful_bf16_dot

    from unidml.kernels.pairwise.dispatch import triton_supports

    faithful_bf16_dot()
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
                check(f"{name} {params} {label}", lambda: check_edge(name, params, label, z, y, ref, "triton"))
        else:  # every dtype pair for the first loss and the memory bank; the crash's mixture for all
            first = (name, params) == cases[0]
            pairs = [(a, b) for a in DTYPES for b in DTYPES] if first else [(torch.bfloat16, torch.float32)]
            for emb_dtype, ref_dtype in pairs:
                check(f"{name} {params} {emb_dtype}/{ref_dtype}",
                      lambda: check_mixed(name, params, emb_dtype, ref_dtype))
    if which == "mixed":
        for emb_dtype in DTYPES:
            for bank_dtype in DTYPES:
                check(f"memory bank {emb_dtype}/{bank_dtype}", lambda: check_bank(emb_dtype, bank_dtype))
    assert not failures, "\n".join(failures)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def mixed_grad_rtol(*dtypes) -> float:
    """4u of the coarsest dtype involved: the Triton backward rounds G once to the operand dtype and
    both backends round each gradient once to its input's dtype; 1e-5 when all are fp32."""
    return max(1e-5, 4.0 * max(UNIT_ROUNDOFF[d] for d in dtypes))


def check_mixed(name: str, params: dict, emb_dtype, ref_dtype) -> None:
    """Triton equals the reference through the public API on embeddings and references of two dtypes
    (n = 19 anchors, m = 21 references, d = 20: off the block multiple, not a power of two)."""
    z, y = random_case(19, 20, 4, seed=4, dtype=emb_dtype)
    rz, ry = random_case(21, 20, 4, seed=5, dtype=ref_dtype)
    got = run_loss(name, params, "triton", z, y, (rz, ry))
    want = run_loss(name, params, "reference", z, y, (rz, ry))
    assert got[1].dtype == emb_dtype and got[2].dtype == ref_dtype, "gradients not in the inputs' dtypes"
    assert_same(got, want, 1e-5, f"{name} {emb_dtype}/{ref_dtype}",
                grad_rtol=mixed_grad_rtol(emb_dtype, ref_dtype))


def check_bank(emb_dtype, bank_dtype) -> None:
    """multi_similarity+xbm with its memory bank held in `bank_dtype`: Triton equals the reference on
    the second step (anchors against the bank holding both batches)."""
    gen = torch.Generator().manual_seed(6)
    batches = [(torch.randn(13, 20, generator=gen).to(emb_dtype), torch.randint(0, 3, (13,), generator=gen))
               for _ in range(2)]
    results = []
    for backend in ("triton", "reference"):
        loss = build_loss("multi_similarity", embedding_dim=20, memory={"size": 30}, backend=backend)
        loss.memory_emb = loss.memory_emb.to(bank_dtype)
        loss.train()
        for z, y in batches:
            zz = z.clone().requires_grad_()
            value = loss(zz, y)
            value.backward()
        assert loss.memory_emb.dtype == bank_dtype
        results.append((value.detach(), zz.grad, None, loss.terms))
    assert_same(results[0], results[1], 1e-5, f"bank {emb_dtype}/{bank_dtype}",
                grad_rtol=mixed_grad_rtol(emb_dtype, bank_dtype))


# Edge cases made of copies of one point set: how many copies of each point (z, or the references).
COPIES = {"ties": 2, "near duplicates": 3, "duplicated references": 3, "duplicates across labels": 2}


def _fold(result, copies: int):
    """(loss, grad z, grad ref, terms) with the copied gradient summed over the copies of each point."""
    value, gz, gr, terms = result
    if gr is None:
        return value, gz.view(copies, -1, gz.shape[1]).sum(0), None, terms
    return value, gz, gr.view(copies, -1, gr.shape[1]).sum(0), terms


def check_edge(name: str, params: dict, label: str, z, y, ref, backend: str, chunk_rows=None) -> None:
    """`backend` equals the reference on one edge case: loss and terms to 1e-5, gradients to 1e-5 of
    their scale (float32 sums of at most a few hundred terms differ by far less), and pair counts
    exactly (integers decided by the duplicate rule, so no rounding may change them)."""
    if label == "duplicates across labels" and params.get("mining") == "semi_hard":
        return  # a positive and a negative that are copies tie in exact arithmetic (docs/design.md)
    got = run_loss(name, params, backend, z, y, ref, chunk_rows)
    want = run_loss(name, params, "reference", z, y, ref)
    if label in COPIES and params.get("mining") == "batch_hard":
        # The hardest pair may be any copy of a point: compare gradients summed over the copies.
        got, want = _fold(got, COPIES[label]), _fold(want, COPIES[label])
    assert_same(got, want, 1e-5, f"{name} {label}")
    got_counts = pair_counts(name, params, backend, z, y, ref, chunk_rows)
    want_counts = pair_counts(name, params, "reference", z, y, ref)
    assert torch.equal(got_counts, want_counts), f"{name} {label}: counts {got_counts} vs {want_counts}"
