"""Adding a pairwise loss takes one new module: a row program and a `PairwiseLoss` registered by name.

Everything here lives in this test file, nothing else in unidml changes: the example loss is found
by the registry, validated as a config section, built by the engine's factory, rejected with one line
for a backend it has no kernel for, and computed by the reference and tiled backends equal to a
direct dense formula. (docs/design.md, "How to add a loss", lists the same steps.)
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from unidml.losses import LOSSES, PairwiseLoss, build_loss, build_loss_from_config, register_loss, validate_loss_params

NAME = "pull_push_example"


@dataclass(frozen=True)
class PullPushRows:
    """Row program: tightness Σ_pos (1 - S_ij), contrast Σ_neg relu(S_ij - margin), each averaged over its pairs."""

    margin: float
    metric: str = "cosine"
    name = NAME

    def rows(self, v: Tensor, pos: Tensor, neg: Tensor, not_self: Tensor) -> tuple[Tensor, Tensor]:
        pull = torch.where(pos, 1.0 - v, torch.zeros_like(v)).sum(1)
        push = torch.where(neg, torch.relu(v - self.margin), torch.zeros_like(v)).sum(1)
        counts = torch.stack([pos.sum(1), neg.sum(1)], dim=1).to(v.dtype)
        return torch.stack([pull, push], dim=1), counts


@pytest.fixture
def example_loss():
    """Register the example loss for one test (and leave the registry as it was afterwards)."""
    @register_loss(NAME)
    class PullPushLoss(PairwiseLoss):
        """Mean (1 - cosine) over positive pairs plus mean hinge relu(cosine - margin) over negative pairs."""

        def __init__(self, margin: float = 0.3, backend: str = "auto", device: torch.device | str | None = None,
                     cross_rank: bool = False, chunk_rows: int | None = None) -> None:
            super().__init__(PullPushRows(float(margin)), normalize=True, backend=backend, device=device,
                             cross_rank=cross_rank, chunk_rows=chunk_rows)

    yield PullPushLoss
    del LOSSES[NAME], LOSSES[NAME + "+xbm"]


def dense_oracle(z: Tensor, y: Tensor, margin: float) -> Tensor:
    """The loss written directly on the n x n cosine matrix, self-pairs excluded."""
    s = F.normalize(z, dim=1) @ F.normalize(z, dim=1).T
    same = y[:, None] == y[None, :]
    off_diagonal = ~torch.eye(len(y), dtype=torch.bool)
    pos, neg = same & off_diagonal, ~same
    return (1.0 - s)[pos].mean() + torch.relu(s - margin)[neg].mean()


def test_the_registry_finds_validates_and_builds_it(example_loss):
    assert LOSSES[NAME] is example_loss
    validate_loss_params({"name": NAME, "margin": 0.1, "backend": "tiled"})
    with pytest.raises(ValueError, match="unknown parameter 'marign'"):
        validate_loss_params({"name": NAME, "marign": 0.1})
    loss = build_loss_from_config({"name": NAME, "margin": 0.2}, num_classes=5, embedding_dim=8, device="cpu")
    assert isinstance(loss, example_loss) and loss.backend == "tiled" and loss.spec.margin == 0.2


def test_its_cross_batch_memory_variant_exists_though_registered_after_xbm(example_loss):
    import unidml.losses.xbm  # noqa: F401  (imported before the example loss was registered)

    loss = build_loss(NAME, embedding_dim=8, memory={"size": 8}, device="cpu")
    assert type(loss).__name__ == "PullPushLossWithMemory" and loss.size == 8
    validate_loss_params({"name": NAME + "+xbm", "margin": 0.1, "memory": {"size": 16}})


def test_a_backend_without_kernel_fails_once_at_build(example_loss):
    pytest.importorskip("triton")  # without the package the same call fails earlier, naming the package
    with pytest.raises(ValueError, match="no triton kernel for PullPushRows") as info:
        build_loss(NAME, backend="triton", device="cuda")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend, chunk_rows", [("reference", None), ("tiled", None), ("tiled", 3)])
def test_backends_match_the_dense_formula(example_loss, backend, chunk_rows):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(13, 6, generator=gen, dtype=torch.float64).float()
    y = torch.randint(0, 3, (13,), generator=gen)
    loss = build_loss(NAME, margin=0.25, backend=backend, chunk_rows=chunk_rows)
    got_z = z.clone().requires_grad_()
    value = loss(got_z, y)
    value.backward()
    want_z = z.double().clone().requires_grad_()
    want = dense_oracle(want_z, y, 0.25)
    want.backward()
    # fp32 sums of ~n² terms of size O(1) against a float64 oracle: a few hundred ulps at most.
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(got_z.grad.double(), want_z.grad, rtol=1e-4, atol=1e-6)
    terms = loss.terms
    assert (terms["tightness"] + terms["contrast"]).item() == pytest.approx(value.item(), rel=1e-6)
