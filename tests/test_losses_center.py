"""Center loss: batch and learned centers, reductions, references, gradients."""
import pytest
import torch

from unidml.losses import build_loss


def _loss(**params):
    return build_loss("center", num_classes=3, embedding_dim=2, **params)


def test_batch_centers_exact():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 2])
    loss = _loss(reduction="sum")
    # class 0 center (1, 0): distances² 1 + 1; class 2 alone: 0.  ½ Σ = 1.
    assert loss(z, y).item() == pytest.approx(1.0)
    assert loss.terms["contrast"].item() == 0.0
    assert _loss()(z, y).item() == pytest.approx(1.0 / 3)


def test_gradient_through_batch_centers():
    z = torch.randn(7, 2, requires_grad=True)
    y = torch.tensor([0, 1, 1, 2, 0, 1, 2])
    got, = torch.autograd.grad(_loss()(z, y), z)
    centers = torch.stack([z[y == k].mean(0) for k in range(3)])
    want, = torch.autograd.grad(0.5 * ((z - centers[y]) ** 2).sum(1).mean(), z)
    torch.testing.assert_close(got, want)
    # Within-class scatter: moving every point of a class together leaves the loss unchanged.
    assert got.sum(0).abs().max() < 1e-6


def test_learned_centers_are_parameters():
    loss = _loss(centers="learned")
    z, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    value = loss(z, y)
    expected = 0.5 * ((z - loss.centers[y]) ** 2).sum(1).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert loss.centers.grad is not None and loss.centers.grad[0].abs().sum() > 0


def test_references_define_centers_and_missing_classes_count_zero():
    z, y = torch.tensor([[1.0, 1.0], [4.0, 0.0]]), torch.tensor([0, 2])
    ref, ref_y = torch.tensor([[0.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])
    # class 0 center (0, 1) -> ½·(1 + 0) ; class 2 absent from the references -> 0
    assert _loss(reduction="sum")(z, y, ref_emb=ref, ref_labels=ref_y).item() == pytest.approx(0.5)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown centers"):
        _loss(centers="ema")
    with pytest.raises(ValueError, match="unknown reduction"):
        _loss(reduction="max")


def test_batch_centers_take_any_integer_labels():
    """Labels 1e9 and negative ones are class ids like any other: the loss equals the one on the same
    classes numbered 0..k-1 (it used to size buffers by max(label) + 1: 8 GB for 1e9, bincount's error
    for a negative label)."""
    gen = torch.Generator().manual_seed(0)
    z, ref = torch.randn(6, 3, generator=gen), torch.randn(5, 3, generator=gen)
    small, ref_small = torch.tensor([0, 1, 1, 2, 0, 3]), torch.tensor([1, 0, 2, 2, 4])
    ids = torch.tensor([-7, 10**9, 10**9 + 1, 2**40, -1])  # an arbitrary relabelling of 0..4
    for loss in (build_loss("center", num_classes=3, embedding_dim=3),
                 build_loss("center", num_classes=3, embedding_dim=3, reduction="sum")):
        want = loss(z, small)
        torch.testing.assert_close(loss(z, ids[small]), want, rtol=0, atol=1e-6 * max(want.item(), 1.0))
        want = loss(z, small, ref_emb=ref, ref_labels=ref_small)
        got = loss(z, ids[small], ref_emb=ref, ref_labels=ids[ref_small])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * max(want.item(), 1.0))


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]])
def test_learned_centers_refuse_labels_out_of_range(labels):
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 3\)$"):
        _loss(centers="learned")(torch.randn(2, 2), torch.tensor(labels))
