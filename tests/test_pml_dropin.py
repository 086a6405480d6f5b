"""unidml losses as drop-ins for pytorch-metric-learning (PML): a PML miner's output passed as
`indices_tuple` gives PML's loss value and gradient with that miner, called exactly as PML's losses are."""
from __future__ import annotations

import inspect
import pydoc

import pytest
import torch
from losses_helpers import random_case
from pytorch_metric_learning import distances, losses, miners

import unidml.losses as L

# (ours, PML's) with the same settings.
LOSSES = {
    "contrastive": lambda: (L.ContrastiveLoss(pos_margin=0.2, neg_margin=0.9),
                            losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.9)),
    "contrastive_cosine": lambda: (L.ContrastiveLoss(pos_margin=0.8, neg_margin=0.3, distance="cosine"),
                                   losses.ContrastiveLoss(pos_margin=0.8, neg_margin=0.3,
                                                          distance=distances.CosineSimilarity())),
    "triplet": lambda: (L.TripletLoss(margin=0.1), losses.TripletMarginLoss(margin=0.1)),
    "triplet_cosine": lambda: (L.TripletLoss(margin=0.2, distance="cosine"),
                               losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity())),
    "multi_similarity": lambda: (L.MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.4),
                                 losses.MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.4)),
}
# Pair miners (a1, p, a2, n) and triplet miners (a, p, n); each loss converts as PML does.
MINERS = {
    "multi_similarity": lambda: miners.MultiSimilarityMiner(epsilon=0.2),
    "pair_margin": lambda: miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.6),
    "triplet_semihard": lambda: miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
    "triplet_all": lambda: miners.TripletMarginMiner(margin=0.3, type_of_triplets="all"),
    "batch_hard": lambda: miners.BatchHardMiner(),
}


def _value_and_grads(loss, z, y, ref=None, mined=None):
    zz = z.detach().clone().requires_grad_()
    rr = None if ref is None else ref[0].detach().clone().requires_grad_()
    # Positional, as PML's documentation writes it: loss(embeddings, labels, indices_tuple, ref_emb, ref_labels).
    value = loss(zz, y, mined, rr, None if ref is None else ref[1])
    value.backward()
    return value.detach(), zz.grad, None if rr is None else rr.grad


def _assert_same(ours, theirs):
    # Both evaluate the same fp32 formulas on <= 48 x 48 pair matrices; only the summation order differs,
    # a relative error of about n·u = 48 · 6e-8 ≈ 3e-6 per sum: 1e-5 (value) and 1e-4 (gradient) cover it.
    assert ours[0].item() == pytest.approx(theirs[0].item(), rel=1e-5, abs=1e-6)
    for got, want in zip(ours[1:], theirs[1:]):
        if want is None:
            assert got is None or not got.abs().any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(want.abs().max().item(), 1e-3))


@pytest.mark.parametrize("miner_name", list(MINERS))
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_pml_miner_output_gives_pml_loss(loss_name, miner_name):
    for seed, (n, classes) in enumerate([(32, 4), (48, 10)]):
        z, y = random_case(n, 16, classes, seed + 300)
        ours, theirs = LOSSES[loss_name]()
        mined = MINERS[miner_name]()(z, y)
        assert sum(len(t) for t in mined) > 0, "the case should mine something"
        _assert_same(_value_and_grads(ours, z, y, mined=mined), _value_and_grads(theirs, z, y, mined=mined))


@pytest.mark.parametrize("loss_name", ["contrastive", "triplet", "multi_similarity"])
def test_pml_miner_with_references(loss_name):
    z, y = random_case(20, 8, 4, 7)
    ref = random_case(26, 8, 4, 8)
    ours, theirs = LOSSES[loss_name]()
    mined = miners.MultiSimilarityMiner(epsilon=0.3)(z, y, ref[0], ref[1])
    _assert_same(_value_and_grads(ours, z, y, ref, mined), _value_and_grads(theirs, z, y, ref, mined))


def test_nothing_mined_gives_zero_like_pml():
    z, y = random_case(16, 8, 4, 1)
    empty = tuple(torch.zeros(0, dtype=torch.long) for _ in range(3))
    for name in ("contrastive", "triplet", "multi_similarity"):
        ours, theirs = LOSSES[name]()
        assert ours(z, y, empty).item() == theirs(z, y, empty).item() == 0.0


def test_bad_indices_tuple_is_one_clear_line():
    z, y = random_case(8, 4, 2, 0)
    loss = L.TripletLoss()
    with pytest.raises(ValueError, match=r"miner's pairs .* got Tensor; references go in ref_emb"):
        loss(z, y, z)  # the pre-PML call order: references as the third argument
    with pytest.raises(ValueError, match=r"indices_tuple\[1\] holds an index outside \[0, 8\)"):
        loss(z, y, (torch.tensor([0]), torch.tensor([8]), torch.tensor([1])))
    with pytest.raises(ValueError, match=r"does not take indices_tuple"):
        L.build_loss("cross_entropy", num_classes=2, embedding_dim=4)(z, y, miners.BatchHardMiner()(z, y))


@pytest.mark.parametrize("cls", [L.ContrastiveLoss, L.TripletLoss, L.MultiSimilarityLoss])
def test_pairwise_loss_classes_document_their_parameters(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert cls.__name__ in L.__all__
    head = text.split("Method resolution order")[0]
    assert "Parameters:" in head and "indices_tuple" in head
    registered = next(name for name, c in L.LOSSES.items() if c is cls)
    assert all(f"{name}:" in head for name in L.loss_parameters(registered))


def test_every_registered_loss_is_exported_with_its_own_docstring():
    for name, cls in L.LOSSES.items():
        assert getattr(L, cls.__name__, None) is cls or name.endswith("+xbm"), name
        assert inspect.getdoc(cls) and inspect.getdoc(cls) != inspect.getdoc(torch.nn.Module), name


def test_evaluate_model_takes_a_plain_images_labels_loader():
    """A torch DataLoader yielding (images, labels), as in one's own loop: the same metrics as
    `retrieval_metrics` on the model's embeddings of those images (one process)."""
    from torch.utils.data import DataLoader, TensorDataset

    from unidml.evaluation import evaluate_model, retrieval_metrics

    torch.manual_seed(0)
    images, labels = torch.randn(30, 3, 8, 8), torch.randint(0, 4, (30,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6)).eval()
    loader = DataLoader(TensorDataset(images, labels), batch_size=7)
    got = evaluate_model(model, loader, ks=[1, 2], precision="fp32")
    with torch.no_grad():
        want = retrieval_metrics(model(images), labels, ks=[1, 2])
    # Same fp32 network on the same inputs in batches of 7 vs all 30: matmul blocking may change the
    # last bit of an embedding, which can only flip an exact tie; none here, so the metrics are equal.
    assert {k: got[k] for k in want} == pytest.approx(want)
