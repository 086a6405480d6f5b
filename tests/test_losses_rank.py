"""Rank-based losses (Smooth-AP, the Recall@k surrogate): against pytorch-metric-learning's SmoothAPLoss,
against dense formulas written here, and the tiled backend against the reference in value and gradient."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses

from unidml.kernels.ranks import rank_rows
from unidml.losses import RecallAtKLoss, SmoothAPLoss, build_loss, validate_loss_params

F64 = torch.float64


def _bench_module(name: str):
    """A module of bench/ (the memory accounting the benchmarks report is the one these tests check)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MEMORY = _bench_module("memory_events")
# fp64 sums of at most a few thousand sigmoids, run in two summation orders: far below 1e-12 relative.
EXACT = 1e-12


def _batch(sizes, d, seed, shuffle=False, dtype=F64):
    """Embeddings near their class centres (so the ranks are neither all 1 nor random) and labels with
    class `c` repeated sizes[c] times, with arbitrary label ids; optionally in a random order."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(100, generator=gen)[:len(sizes)]
    y = torch.repeat_interleave(ids, torch.tensor(sizes))
    centres = torch.randn(100, d, generator=gen, dtype=F64)
    z = centres[y] + 1.5 * torch.randn(len(y), d, generator=gen, dtype=F64)
    if shuffle:
        order = torch.randperm(len(y), generator=gen)
        z, y = z[order], y[order]
    return z.to(dtype), y


def _value_and_grads(loss_fn, z, y, ref=None):
    zz = z.detach().clone().requires_grad_()
    rr = None if ref is None else ref[0].detach().clone().requires_grad_()
    value = loss_fn(zz, y, None, rr, None if ref is None else ref[1])
    value.backward()
    return value.detach(), zz.grad, None if rr is None else rr.grad


def _assert_close(got, want, rtol, what=""):
    assert abs(got[0].item() - want[0].item()) <= rtol * max(1.0, abs(want[0].item())), \
        f"{what}: loss {got[0].item()} vs {want[0].item()}"
    for g, w in zip(got[1:], want[1:]):
        if w is not None:
            err, scale = (g - w).abs().max().item(), max(w.abs().max().item(), 1e-12)
            assert err <= rtol * scale, f"{what}: gradient error {err} vs scale {scale}"


# ---- dense formulas, written from the papers' definitions with explicit masks ----

def _sigmoid_diffs(s, tau):
    """sig[q, i, k] = σ((S_qk − S_qi)/τ)."""
    return torch.sigmoid((s[:, None, :] - s[:, :, None]) / tau)


def dense_smooth_ap(z, y, ref=None, tau=0.01):
    """Brown et al.'s Smooth-AP as their code computes it: the references (the batch, query included)
    ranked for every query, positives = same label (query included), mean of 1 − AP over the queries
    with a positive."""
    x = F.normalize(z, dim=1)
    r, r_y = (x, y) if ref is None else (F.normalize(ref[0], dim=1), ref[1])
    s = x @ r.T
    m = r.shape[0]
    not_same = (1 - torch.eye(m, dtype=z.dtype))[None]  # k ≠ i
    pos = (y[:, None] == r_y[None, :]).to(z.dtype)
    sig = _sigmoid_diffs(s, tau) * not_same
    rank_all = 1 + sig.sum(2)
    rank_pos = 1 + (sig * pos[:, None, :]).sum(2)
    counted = pos.sum(1) > 0
    ap = (pos * rank_pos / rank_all).sum(1)[counted] / pos.sum(1)[counted]
    return (1 - ap).mean()


def dense_recall_at_k(z, y, ref=None, tau=0.01, k_tau=1.0, ks=(1, 2, 4, 8, 16)):
    """Patel et al.'s Recall@k surrogate: for query q, Ω = references without q, P = same label in Ω,
    R(i) = 1 + Σ_{j∈Ω, j≠i} σ((s_qj − s_qi)/τ), r_k = Σ_{i∈P} σ((k − R(i))/τ_k) / min(k, |P|),
    loss = mean over queries with a positive of 1 − mean_k r_k."""
    x = F.normalize(z, dim=1)
    r, r_y = (x, y) if ref is None else (F.normalize(ref[0], dim=1), ref[1])
    n, m = x.shape[0], r.shape[0]
    omega = torch.ones(n, m, dtype=z.dtype)
    if ref is None:
        omega -= torch.eye(n, dtype=z.dtype)
    pos = (y[:, None] == r_y[None, :]).to(z.dtype) * omega
    keep = omega[:, None, :] * (1 - torch.eye(m, dtype=z.dtype))[None]  # j ∈ Ω, j ≠ i
    rank = 1 + (_sigmoid_diffs(x @ r.T, tau) * keep).sum(2)
    count = pos.sum(1)
    counted = count > 0
    recall = sum((torch.sigmoid((k - rank) / k_tau) * pos).sum(1)[counted] / torch.clamp(count[counted], max=k)
                 for k in ks) / len(ks)
    return (1 - recall).mean()


# ---- Smooth-AP against pytorch-metric-learning ----

# PML's SmoothAPLoss stores each AP in an fp32 buffer (`torch.zeros(batch_size)`) and scales by an fp32
# 1/n: on fp64 inputs its value and gradient carry one fp32 rounding, 2^-24 relative.
PML_RTOL = 2.0 ** -24


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("classes, seed", [(4, 0), (6, 1), (8, 2), (5, 3), (7, 4)])
def test_smooth_ap_matches_pml(classes, seed, backend):
    """PML's layout (contiguous classes of equal size, as many classes as images per class), fp64."""
    z, y = _batch([classes] * classes, 16, seed)
    ours = _value_and_grads(SmoothAPLoss(backend=backend, chunk_rows=5), z, y)
    theirs = _value_and_grads(pml_losses.SmoothAPLoss(temperature=0.01), z, y)
    _assert_close(ours, theirs, PML_RTOL, f"{classes}x{classes}")
    assert 0.05 < ours[0].item() < 0.95, "the case should be neither solved nor random"


@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_smooth_ap_matches_pml_at_other_temperatures(temperature):
    z, y = _batch([6] * 6, 12, 5)
    ours = _value_and_grads(SmoothAPLoss(temperature=temperature, backend="tiled", chunk_rows=7), z, y)
    theirs = _value_and_grads(pml_losses.SmoothAPLoss(temperature=temperature), z, y)
    _assert_close(ours, theirs, PML_RTOL)


def test_smooth_ap_does_not_depend_on_batch_order():
    """PML needs contiguous classes; ours gives PML's value for any order, the gradient permuted alike."""
    z, y = _batch([5] * 5, 16, 6)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    ours = _value_and_grads(SmoothAPLoss(backend="tiled", chunk_rows=4), z[order], y[order])
    theirs = _value_and_grads(pml_losses.SmoothAPLoss(), z, y)
    _assert_close((ours[0], ours[1][order.argsort()]), theirs[:2], PML_RTOL)


def test_pml_refuses_unequal_classes_ours_follows_the_formula():
    z, y = _batch([3, 5, 1, 4], 8, 7)
    with pytest.raises(ValueError, match="same number of elements"):
        pml_losses.SmoothAPLoss()(z, y)
    for backend in ("reference", "tiled"):
        got = SmoothAPLoss(backend=backend)(z, y)
        assert abs(got.item() - dense_smooth_ap(z, y).item()) <= EXACT


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("sizes, seed, with_ref", [
    ([3, 5, 1, 4, 2], 8, False), ([2] * 9, 9, False), ([7, 1, 1, 6], 10, False), ([4, 3, 6], 11, True)])
def test_smooth_ap_matches_the_dense_formula(sizes, seed, with_ref, backend):
    z, y = _batch(sizes, 10, seed, shuffle=True)
    ref = _batch([3, 2, 5, 1], 10, seed + 50, shuffle=True) if with_ref else None
    if ref is not None:
        ref = (ref[0], torch.cat([y[:6], ref[1][6:]]))  # some shared labels, some anchors without a positive
    ours = _value_and_grads(SmoothAPLoss(backend=backend, chunk_rows=3), z, y, ref)
    want = _value_and_grads(lambda a, b, _i, c, d: dense_smooth_ap(a, b, None if c is None else (c, d)), z, y, ref)
    _assert_close(ours, want, 1e-10)


# ---- the Recall@k surrogate against its dense formula ----

@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("sizes, seed, params", [
    ([4] * 8, 0, {}),
    ([3, 5, 1, 4, 2, 6], 1, {}),  # unequal classes, one anchor without a positive
    ([8] * 5, 2, {"k_temperature": 0.5, "temperature": 0.05}),
    ([2] * 12, 3, {"ks": [1, 4, 30]}),  # k beyond the batch: every positive counts
])
def test_recall_at_k_matches_the_dense_formula(sizes, seed, params, backend):
    z, y = _batch(sizes, 12, seed, shuffle=True)
    ours = _value_and_grads(RecallAtKLoss(backend=backend, chunk_rows=5, **params), z, y)
    keys = {"temperature": "tau", "k_temperature": "k_tau", "ks": "ks"}
    dense = {keys[k]: v for k, v in params.items()}
    want = _value_and_grads(lambda a, b, *_: dense_recall_at_k(a, b, **dense), z, y)
    _assert_close(ours, want, 1e-10)
    assert 0.02 < ours[0].item() < 0.98


def test_recall_at_k_with_references():
    z, y = _batch([3, 4, 2], 8, 4, shuffle=True)
    rz, ry = _batch([5, 2, 6, 3], 8, 5, shuffle=True)
    ry = torch.where(ry == ry[0], y[0], ry)  # one class shared with the anchors, the others not
    ref = (rz, ry)
    want = _value_and_grads(lambda a, b, _i, c, d: dense_recall_at_k(a, b, (c, d)), z, y, ref)
    for backend in ("reference", "tiled"):
        _assert_close(_value_and_grads(RecallAtKLoss(backend=backend, chunk_rows=2), z, y, ref), want, 1e-10)


# ---- tiled against reference ----

@pytest.mark.parametrize("name", ["smooth_ap", "recall_at_k"])
@pytest.mark.parametrize("chunk, block", [(1, 1), (4, 3), (7, 64), (None, None)])
@pytest.mark.parametrize("with_ref", [False, True])
def test_tiled_equals_reference_in_value_and_gradient(name, chunk, block, with_ref):
    """Every chunk and block split, fp64, to fp64 summation-order error."""
    z, y = _batch([3, 5, 1, 4, 6, 2], 10, 20, shuffle=True)
    ref = _batch([4, 2, 7], 10, 21, shuffle=True) if with_ref else None
    program = build_loss(name).program
    results = []
    for backend, c, b in (("reference", None, None), ("tiled", chunk, block)):
        zz = z.clone().requires_grad_()
        rr = None if ref is None else ref[0].clone().requires_grad_()
        x = F.normalize(zz, dim=1)
        r, r_y, offset = (x, y, 0) if ref is None else (F.normalize(rr, dim=1), torch.cat([y[:4], ref[1][4:]]), None)
        per_anchor, counted = rank_rows(program, x, r, y, r_y, offset, backend, c, b)
        weights = torch.linspace(0.5, 1.5, len(y), dtype=F64)  # an uneven upstream gradient per anchor
        (per_anchor * weights).sum().backward()
        results.append((per_anchor.detach(), counted, zz.grad, None if rr is None else rr.grad))
    (want, want_counted, *want_grads), (got, got_counted, *got_grads) = results
    assert torch.equal(got_counted, want_counted)
    torch.testing.assert_close(got, want, rtol=0, atol=EXACT)
    for g, w in zip(got_grads, want_grads):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=EXACT * w.abs().max().item())


@pytest.mark.parametrize("name", ["smooth_ap", "recall_at_k"])
def test_tiled_equals_reference_in_fp32(name):
    """fp32: both backends evaluate the same elementwise values, summed in other orders (n = 64: about
    64 · 2^-24 relative per rank, amplified by 1/τ at most in the gradient)."""
    z, y = _batch([4] * 16, 32, 30, shuffle=True, dtype=torch.float32)
    ref = _value_and_grads(build_loss(name, backend="reference"), z, y)
    tiled = _value_and_grads(build_loss(name, backend="tiled", chunk_rows=9), z, y)
    assert tiled[1].dtype == torch.float32
    _assert_close(tiled, ref, 1e-4)


@pytest.mark.parametrize("name", ["smooth_ap", "recall_at_k"])
def test_tiled_keeps_no_cubic_tensor(name):
    """The tiled graph holds a few n x d tensors (the embeddings, their normalisation and its input twice:
    anchors and references) and the labels; the reference holds the n³ sigmoids."""
    n, d = 96, 16
    z, y = _batch([4] * (n // 4), d, 40, dtype=torch.float32)
    cubic = n ** 3 * 4
    for backend, check in (("tiled", lambda b: b <= 8 * n * d * 4 + 2 * n * 8),
                           ("reference", lambda b: b >= cubic)):
        zz = z.clone().requires_grad_()
        saved, value = MEMORY.saved_bytes(lambda: build_loss(name, backend=backend, chunk_rows=8)(zz, y))
        assert check(saved), f"{backend}: {saved} bytes saved for backward"
        value.backward()


def test_tiled_peak_memory_is_a_chunk():
    """Peak tensor bytes of one forward+backward (the profiler's CPU allocator events): the tiled backend
    stays far below one n x n x n tensor."""

    n = 128
    z, y = _batch([4] * (n // 4), 32, 41, dtype=torch.float32)

    def peak(backend):
        zz = z.clone().requires_grad_()
        return MEMORY.peak_cpu_bytes(lambda: build_loss("smooth_ap", backend=backend, chunk_rows=8)(zz, y).backward())

    cubic = n ** 3 * 4
    assert peak("reference") >= cubic
    assert peak("tiled") <= cubic / 4


# ---- the loss shell ----

@pytest.mark.parametrize("cls", [SmoothAPLoss, RecallAtKLoss])
def test_terms_and_defaults(cls):
    z, y = _batch([4] * 4, 8, 50, dtype=torch.float32)
    loss = cls()
    assert loss.backend == "tiled"  # auto: no Triton kernel, tiled on every device
    value = loss(z, y)
    assert loss.terms["tightness"].item() == 0.0 and loss.terms["contrast"].item() == value.item()


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "fused"}, "unknown backend 'fused' (known: auto, reference, tiled, triton)"),
    ({"backend": "triton"}, "'tiled'"),  # no Triton kernel (or no triton package): use tiled
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"chunk_rows": 0}, "chunk_rows must be >= 1"),
])
@pytest.mark.parametrize("name", ["smooth_ap", "recall_at_k"])
def test_bad_parameters_are_one_line(name, kwargs, message):
    with pytest.raises(ValueError) as info:
        build_loss(name, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("section, message", [
    ({"name": "recall_at_k", "ks": []}, "ks must be a non-empty list"),
    ({"name": "recall_at_k", "ks": [1, 0]}, "ks must be a non-empty list"),
    ({"name": "recall_at_k", "k_temperature": -1.0}, "k_temperature must be > 0"),
    ({"name": "smooth_ap", "margin": 0.1}, "unknown parameter 'margin'"),
])
def test_config_validation(section, message):
    with pytest.raises(ValueError, match=message):
        validate_loss_params(section)


def test_config_sections_validate():
    validate_loss_params({"name": "smooth_ap", "temperature": 0.01, "backend": "tiled"})
    validate_loss_params({"name": "recall_at_k", "ks": [1, 2, 4], "k_temperature": 1.0})


def test_refuses_indices_tuple():
    z, y = _batch([4] * 4, 8, 51, dtype=torch.float32)
    pairs = tuple(torch.tensor([0]) for _ in range(4))
    with pytest.raises(ValueError, match="does not take indices_tuple"):
        SmoothAPLoss()(z, y, pairs)
