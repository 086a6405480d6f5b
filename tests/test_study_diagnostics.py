"""MI diagnostics on cases with known values: separated classes, identical embeddings, a brute-force oracle."""
import math

import numpy as np
import pytest
import torch

from unidml.data_pipeline.dataset import ImageSet
from unidml.evaluation.diagnostics import (
    classifier_conditional_entropy,
    diagnostic_sample,
    knn_conditional_entropy,
    mi_diagnostics,
)
from unidml.losses import build_loss


def balanced_labels(classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)


def test_identical_embeddings_carry_no_information():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # unbalanced on purpose
    z = torch.ones(len(y), 5)
    out = knn_conditional_entropy(z, y, temperature=0.05)
    n = len(y)
    sizes = torch.bincount(y)[y].double()
    expected = float(-torch.log((sizes - 1) / (n - 1)).mean())  # leave-one-out class frequencies
    assert out["cond_entropy_knn"] == pytest.approx(expected, abs=1e-12)
    assert out["loo_label_entropy"] == pytest.approx(expected, abs=1e-12)
    assert out["mi_knn"] == pytest.approx(0.0, abs=1e-12)
    assert out["knn_points"] == n


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_perfectly_separated_classes(metric):
    classes, m, tau = 4, 3, 0.1
    y = balanced_labels(classes, m)
    z = torch.eye(classes)[y]  # one orthonormal direction per class
    out = knn_conditional_entropy(z, y, temperature=tau, metric=metric)
    n = len(y)
    # cosine: s = 1 within a class, 0 across; euclidean: s = -|zi - zj|^2 = 0 within, -2 across.
    gap = 1.0 if metric == "cosine" else 2.0
    posterior = (m - 1) / ((m - 1) + (n - m) * math.exp(-gap / tau))
    assert out["cond_entropy_knn"] == pytest.approx(-math.log(posterior), rel=1e-9)
    assert out["loo_label_entropy"] == pytest.approx(math.log((n - 1) / (m - 1)), rel=1e-12)
    sharp = knn_conditional_entropy(z, y, temperature=1e-3, metric=metric)
    assert sharp["cond_entropy_knn"] == pytest.approx(0.0, abs=1e-12)
    assert sharp["mi_knn"] == pytest.approx(math.log((n - 1) / (m - 1)), rel=1e-12)


def test_knn_matches_brute_force_and_drops_singletons():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(23, 6, generator=gen)
    y = torch.randint(0, 4, (23,), generator=gen)
    y[-1] = 9  # a class with one member: no leave-one-out neighbour, left out
    tau = 0.3
    zn = torch.nn.functional.normalize(z.double(), dim=1)
    keep = [i for i in range(23) if int((y == y[i]).sum()) > 1]
    logs = []
    for i in keep:
        w = {j: math.exp(float(zn[i] @ zn[j]) / tau) for j in keep if j != i}
        logs.append(math.log(sum(v for j, v in w.items() if y[j] == y[i]) / sum(w.values())))
    out = knn_conditional_entropy(z, y, temperature=tau, block=5)
    assert out["knn_points"] == len(keep) < 23
    assert out["cond_entropy_knn"] == pytest.approx(-sum(logs) / len(logs), rel=1e-10)


def test_classifier_estimate_known_values():
    y = torch.tensor([0, 1, 2, 1])
    prior = np.array([0.25, 0.5, 0.25])
    uniform = classifier_conditional_entropy(torch.zeros(4, 3), y, prior)
    assert uniform["cond_entropy_classifier"] == pytest.approx(math.log(3))
    assert uniform["prior_entropy"] == pytest.approx(-(2 * math.log(0.25) + 2 * math.log(0.5)) / 4)
    confident = classifier_conditional_entropy(100.0 * torch.eye(3)[y], y, prior)
    assert confident["cond_entropy_classifier"] == pytest.approx(0.0, abs=1e-12)
    assert confident["mi_classifier"] == pytest.approx(confident["prior_entropy"])


def test_sample_takes_whole_classes_with_contiguous_labels():
    labels = np.repeat(np.array([10, 20, 30, 40, 50]), [4, 4, 4, 4, 3])
    images = ImageSet("train", tuple(f"img{i}.jpg" for i in range(len(labels))), labels)
    sample = diagnostic_sample(images, max_images=9, seed=1)
    kept = sample.images.labels
    assert len(kept) <= 9 and len(np.unique(kept)) >= 2
    for cls in np.unique(kept):  # every chosen class is complete
        assert (kept == cls).sum() == (images.contiguous_labels() == cls).sum()
    for path, label in zip(sample.images.paths, kept):
        assert images.contiguous_labels()[int(path[3:-4])] == label
    np.testing.assert_allclose(sample.class_prior, np.array([4, 4, 4, 4, 3]) / 19)


def test_mi_diagnostics_end_to_end_with_a_classifier():
    class Lookup(torch.nn.Module):  # "images" are class ids; the net maps them to separated embeddings
        def forward(self, x):
            return 5.0 * torch.eye(3)[x[:, 0].long()]

    y = balanced_labels(3, 4)
    loader = [(y[:, None].float(), y, torch.arange(12))]
    loss = build_loss("cross_entropy", num_classes=3, embedding_dim=3, dropout=0.5)
    with torch.no_grad():
        loss.head.weight.copy_(10.0 * torch.eye(3))
    loss.train()
    out = mi_diagnostics(Lookup(), loss, loader, np.full(3, 1 / 3), temperature=0.01, precision="fp32")
    assert out["mi_knn"] == pytest.approx(math.log(11 / 3), rel=1e-9)
    logit_gap = 50.0  # eval mode: no dropout, 10 * 5 on the true class
    assert out["cond_entropy_classifier"] == pytest.approx(math.log(1 + 2 * math.exp(-logit_gap)), rel=1e-6)
    assert out["prior_entropy"] == pytest.approx(math.log(3))
    assert loss.training  # mode restored
    pairwise = mi_diagnostics(Lookup(), build_loss("snca"), loader, np.full(3, 1 / 3), precision="fp32")
    assert "mi_classifier" not in pairwise and "mi_knn" in pairwise
