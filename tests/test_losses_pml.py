"""pytorch-metric-learning as an independent oracle: same value and gradient with matching settings."""
import pytest
import torch
from losses_helpers import random_case, run_loss
from pytorch_metric_learning import distances, losses, miners
from triton_interpreter import assert_runs_interpreted


def _pml(loss_fn, z, y, miner=None, ref=None):
    zz = z.detach().clone().requires_grad_()
    rr = None if ref is None else ref[0].detach().clone().requires_grad_()
    ref_y = None if ref is None else ref[1]
    mined = None if miner is None else miner(zz, y, rr, ref_y)
    value = loss_fn(zz, y, mined, rr, ref_y)
    value.backward()
    return value.detach(), zz.grad, None if rr is None else rr.grad


CASES = [
    ("contrastive", {"pos_margin": 0.3, "neg_margin": 1.2},
     lambda: (losses.ContrastiveLoss(pos_margin=0.3, neg_margin=1.2), None)),
    ("contrastive", {"distance": "cosine", "pos_margin": 0.9, "neg_margin": 0.2},
     lambda: (losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.2, distance=distances.CosineSimilarity()), None)),
    ("triplet", {"margin": 0.2},
     lambda: (losses.TripletMarginLoss(margin=0.2), None)),
    ("triplet", {"margin": 0.2, "mining": "semi_hard"},
     lambda: (losses.TripletMarginLoss(margin=0.2),
              miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"))),
    ("triplet", {"margin": 0.2, "mining": "batch_hard"},
     lambda: (losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner())),
    ("triplet", {"margin": 0.1, "distance": "cosine"},
     lambda: (losses.TripletMarginLoss(margin=0.1, distance=distances.CosineSimilarity()), None)),
    ("multi_similarity", {},
     lambda: (losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1))),
    ("multi_similarity", {"alpha": 1.0, "beta": 10.0, "base": 0.2, "epsilon": 0.4},
     lambda: (losses.MultiSimilarityLoss(alpha=1, beta=10, base=0.2), miners.MultiSimilarityMiner(epsilon=0.4))),
    ("supcon", {"temperature": 0.1}, lambda: (losses.SupConLoss(temperature=0.1), None)),
    ("supcon", {"temperature": 0.5}, lambda: (losses.SupConLoss(temperature=0.5), None)),
]


def check_against_pml(name, params, make, backend, sizes=((32, 4), (45, 9))):
    for seed, (n, classes) in enumerate(sizes):
        z, y = random_case(n, 16, classes, seed + 100)
        ours = run_loss(name, params, backend, z, y, chunk_rows=10)
        loss_fn, miner = make()
        theirs = _pml(loss_fn, z, y, miner)
        assert ours[0].item() == pytest.approx(theirs[0].item(), rel=1e-5, abs=1e-7)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-5 * theirs[1].abs().max().item())


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("name, params, make", CASES)
def test_matches_pml(name, params, make, backend):
    check_against_pml(name, params, make, backend)


def triton_triplets_against_pml():
    """Every triplet case of CASES on the Triton backend (under TRITON_INTERPRET=1) against PML."""
    for name, params, make in CASES:
        if name == "triplet":
            check_against_pml(name, params, make, "triton", sizes=((32, 4),))


@pytest.mark.timeout(300)
def test_triton_triplets_match_pml_under_the_interpreter():
    assert_runs_interpreted("import test_losses_pml as T; T.triton_triplets_against_pml()", timeout=280)


@pytest.mark.parametrize("name, params, make", CASES[::2])
def test_matches_pml_with_references(name, params, make):
    z, y = random_case(20, 8, 4, 7)
    ref = random_case(26, 8, 4, 8)
    loss_fn, miner = make()
    ours = run_loss(name, params, "tiled", z, y, ref, chunk_rows=6)
    theirs = _pml(loss_fn, z, y, miner, ref)
    assert ours[0].item() == pytest.approx(theirs[0].item(), rel=1e-5, abs=1e-7)
    for a, b in ((ours[1], theirs[1]), (ours[2], theirs[2])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
