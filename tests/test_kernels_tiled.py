"""Tiled backend equals the reference (loss, gradients, terms) on random and degenerate cases."""
import pytest
import torch
from losses_helpers import HALF_GRAD_RTOL, PAIRWISE_CASES, assert_same, check_edge, edge_cases, random_case, run_loss


@pytest.mark.parametrize("name, params", PAIRWISE_CASES)
def test_tiled_matches_reference_random(name, params):
    for seed, (n, classes) in enumerate([(29, 5), (40, 3)]):
        z, y = random_case(n, 12, classes, seed)
        want = run_loss(name, params, "reference", z, y)
        got = run_loss(name, params, "tiled", z, y, chunk_rows=7)
        assert_same(got, want, 1e-5, f"{name} {params} seed {seed}")


@pytest.mark.parametrize("name, params", PAIRWISE_CASES)
def test_tiled_matches_reference_edge_cases(name, params):
    for label, z, y, ref in edge_cases():
        check_edge(name, params, label, z, y, ref, "tiled", chunk_rows=5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, params", PAIRWISE_CASES[::3])
def test_half_precision_inputs(name, params, dtype):
    # Both backends compute from the same operands (normalised, in the input's dtype), in fp32.
    z, y = random_case(31, 16, 4, seed=5, dtype=dtype)
    want = run_loss(name, params, "reference", z, y)
    got = run_loss(name, params, "tiled", z, y, chunk_rows=8)
    assert got[1].dtype == dtype
    assert_same(got, want, 1e-5, f"{name} {dtype}", grad_rtol=HALF_GRAD_RTOL[dtype])


def test_single_class_and_singletons_give_zero_where_undefined():
    z, _ = random_case(6, 5, 1, seed=0)
    for name in ("snca", "supcon", "multi_similarity"):
        for y in (torch.arange(6), torch.zeros(6, dtype=torch.long)):
            value, grad, _, _ = run_loss(name, {}, "tiled", z, y)
            assert torch.isfinite(value) and torch.isfinite(grad).all()
    # No positive anywhere: SNCA / SupCon have no valid anchor, so the loss is exactly 0.
    assert run_loss("snca", {}, "tiled", z, torch.arange(6))[0].item() == 0.0


def test_terms_add_up_and_are_detached():
    z, y = random_case(20, 6, 3, seed=9)
    for name, params in PAIRWISE_CASES:
        value, _, _, terms = run_loss(name, params, "tiled", z, y)
        assert not terms["tightness"].requires_grad
        assert value.item() == pytest.approx((terms["tightness"] + terms["contrast"]).item(), rel=1e-6, abs=1e-7)


def test_exact_tiny_contrastive_and_triplet():
    # Two classes on a line (unnormalised Euclidean): distances are hand-computable.
    z = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    y = torch.tensor([0, 0, 1, 1])
    value, _, _, terms = run_loss("contrastive", {"normalize": False, "neg_margin": 2.5, "pos_margin": 0.6},
                                  "tiled", z, y)
    # pos pairs (both directions): d=1 -> 0.4 (x2), d=0.5 -> 0; neg: d=2 -> 0.5 (x2), others >= 2.5
    assert terms["tightness"].item() == pytest.approx(0.4)
    assert terms["contrast"].item() == pytest.approx(0.5)
    value, _, _, terms = run_loss("triplet", {"normalize": False, "margin": 1.5, "mining": "batch_hard"},
                                  "tiled", z, y)
    # anchors: 0: dap=1, dan=3 -> 0 ; 1: 1 vs 2 -> 0.5 ; 2: 0.5 vs 2 -> 0 ; 3: 0.5 vs 2.5 -> 0
    assert value.item() == pytest.approx(0.5)


def test_tiled_memory_never_holds_the_full_matrix(monkeypatch):
    # Every matmul the tiled path issues is at most chunk x m: record the shapes of x_chunk @ r.T.
    import unidml.kernels.pairwise.tiled as tiled

    seen = []
    original = tiled.chunk_values

    def spy(x_chunk, *rest):
        out = original(x_chunk, *rest)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(tiled, "chunk_values", spy)
    z, y = random_case(50, 4, 3, seed=1)
    run_loss("supcon", {}, "tiled", z, y, chunk_rows=8)
    assert seen and max(s[0] for s in seen) == 8 and all(s[1] == 50 for s in seen)


@pytest.mark.parametrize("bad, message", [
    ({"backend": "cuda"}, "unknown backend"),
    ({"mining": "hard"}, "unknown mining"),
    ({"distance": "manhattan"}, "unknown distance"),
])
def test_bad_triplet_options(bad, message):
    from unidml.losses import build_loss
    with pytest.raises(ValueError, match=message):
        build_loss("triplet", **bad)


@pytest.mark.parametrize("params", [{"neg_margin": 0.4}, {"distance": "cosine", "neg_margin": 0.95}])
def test_sparse_backward_path_is_taken_and_exact(monkeypatch, params):
    # Chunks without an active negative skip the dense recompute; the result must not change.
    import unidml.kernels.pairwise.tiled as tiled

    taken = []
    original = tiled._sparse_backward

    def spy(*args):
        taken.append(original(*args))
        return taken[-1]

    monkeypatch.setattr(tiled, "_sparse_backward", spy)
    z, y = random_case(40, 32, 8, seed=2)
    want = run_loss("contrastive", params, "reference", z, y)
    got = run_loss("contrastive", params, "tiled", z, y, chunk_rows=4)
    assert sum(taken) >= 1
    assert_same(got, want, 1e-5, f"sparse {params}")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, y = random_case(4, 3, 2, seed=0)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        run_loss("supcon", {}, "triton", z, y)


@pytest.mark.parametrize("d", [3, 64, 512, 2048])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_duplicate_tolerance_bounds_every_summation_order(d, scale):
    # The rule's coefficient c(d) is twice the first-order worst case (2γ_d + 4u)·(|x|² + |r|²) of the
    # computed squared distance of two copies; check that |d2| stays within half the tolerance for
    # several fp32 summation orders of the dot product and the norms (which differ from each other).
    from unidml.kernels.pairwise.geometry import duplicate_tolerance

    gen = torch.Generator().manual_seed(d)
    x = torch.randn(32, d, generator=gen) * scale
    x[:8] *= torch.rand(8, 1, generator=gen) * 100  # rows of very different norms
    prods = x * x

    def sequential(p):  # left to right, one rounding per addition
        acc = torch.zeros(p.shape[0])
        for k in range(p.shape[1]):
            acc = acc + p[:, k]
        return acc

    orders = {"matmul": torch.diagonal(x @ x.T), "pairwise": prods.sum(1), "sequential": sequential(prods),
              "reversed": sequential(prods.flip(1)), "blocked": prods.view(32, -1, 1).sum(2).sum(1)}
    tol = duplicate_tolerance(d)
    for dot_name, dot in orders.items():
        for norm_name, sq in orders.items():
            d2 = sq + sq - 2.0 * dot
            bound = 0.5 * tol * (sq + sq)
            assert (d2.abs() <= bound).all(), f"{dot_name} dots, {norm_name} norms: {(d2.abs() / bound).max()}"


def test_duplicate_rule_merges_copies_and_nothing_else():
    # Copies (and one-ulp moves) get distance exactly 0 and similarity exactly 1; a pair just outside the
    # radius sqrt(2c) of unit vectors keeps its computed value.
    from unidml.kernels.pairwise.geometry import COSINE, EUCLIDEAN, duplicate_tolerance

    d = 64
    tol = duplicate_tolerance(d)
    a = torch.nn.functional.normalize(torch.randn(1, d, generator=torch.Generator().manual_seed(0)), dim=1)
    step = torch.zeros(1, d)
    step[0, 0] = 3.0 * (2.0 * tol) ** 0.5  # well outside the radius
    b = torch.nn.functional.normalize(a + step, dim=1)
    x = torch.cat([a, torch.nextafter(a, torch.ones_like(a)), b])
    sq = (x * x).sum(1)
    dist = EUCLIDEAN.block_values(x, x, sq, sq, tol)
    sim = COSINE.block_values(x, x, sq, sq, tol)
    assert dist[0, 1] == 0.0 and dist[1, 0] == 0.0 and sim[0, 1] == 1.0
    exact = torch.cdist(x.double(), x.double())[0, 2]
    assert dist[0, 2] > 2.0 * (2.0 * tol) ** 0.5 and abs(dist[0, 2].item() - exact.item()) < 1e-5
    assert sim[0, 2] < 1.0 - tol


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("normalize", [True, False])
def test_near_duplicates_count_like_exact_arithmetic(backend, normalize):
    # Oracle in float64 (direct differences, where copies are exactly or nearly 0 and distinct points far
    # apart): contrastive with pos_margin 0 has an active positive for every pair of distinct same-label
    # points and none between copies; negatives are active where D < neg_margin.
    import torch.nn.functional as F
    from losses_helpers import near_duplicates, pair_counts

    z, y = near_duplicates(7, 9, 3, seed=13)
    params = {"normalize": normalize, "neg_margin": 1.0 if normalize else 40.0}
    x = F.normalize(z.double(), dim=1) if normalize else z.double()
    point = torch.arange(z.shape[0]) % 7  # which original point each row copies
    dist = torch.cdist(x, x)
    same, distinct = y[:, None] == y[None, :], point[:, None] != point[None, :]
    want = torch.tensor([(same & distinct).sum().item(), (~same & (dist < params["neg_margin"])).sum().item()],
                        dtype=torch.float32)
    assert want[0] > 0 and want[1] > 0
    for chunk in (None, 4):
        assert torch.equal(pair_counts("contrastive", params, backend, z, y, chunk_rows=chunk), want)


def test_pair_metrics_are_the_configurable_metrics():
    from unidml.config import METRICS
    from unidml.kernels.pairwise.geometry import PAIR_METRICS, pair_metric

    assert tuple(PAIR_METRICS) == METRICS
    assert pair_metric("cosine").is_inverted and not pair_metric("euclidean").is_inverted
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        pair_metric("manhattan")


@pytest.mark.parametrize("mining", ["all", "semi_hard"])
def test_triplet_oracle_memory_is_bounded_by_anchor_chunks(monkeypatch, mining):
    # The reference enumerates (chunk, m, m) triplets at a time: with room for 3 anchors per chunk it
    # still equals the tiled backend; with less than one anchor's m² it refuses, naming the tiled one.
    import unidml.kernels.pairwise.rows as rows

    z, y = random_case(40, 8, 5, seed=3)
    params = {"margin": 0.3, "mining": mining}
    monkeypatch.setattr(rows, "TRIPLET_ORACLE_ELEMENTS", 3 * 40 * 40)
    shapes = []
    count = rows.TripletRows._triplet_counts
    monkeypatch.setattr(rows.TripletRows, "_triplet_counts",
                        lambda self, u, pos, neg: shapes.append(u.shape) or count(self, u, pos, neg))
    assert_same(run_loss("triplet", params, "reference", z, y), run_loss("triplet", params, "tiled", z, y),
                1e-5, f"triplet {mining}")
    assert max(s[0] for s in shapes) == 3 and sum(s[0] for s in shapes) == 40
    monkeypatch.setattr(rows, "TRIPLET_ORACLE_ELEMENTS", 40 * 40 - 1)
    with pytest.raises(ValueError, match="use backend 'tiled'"):
        run_loss("triplet", params, "reference", z, y)
