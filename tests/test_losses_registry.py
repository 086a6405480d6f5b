"""Loss factory and config-section validation."""
import pytest
import torch
from torch import nn

from unidml.losses import LOSSES, build_loss, build_loss_from_config, register_loss, validate_loss_params

EXPECTED = {"cross_entropy", "pce", "contrastive", "triplet", "multi_similarity", "snca", "supcon", "center"}


def test_registry_names():
    assert EXPECTED <= set(LOSSES)


def test_engine_sizes_forwarded_only_when_accepted(monkeypatch):
    class Sizeless(nn.Module):
        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

    monkeypatch.setitem(LOSSES, "sizeless", Sizeless)
    loss = build_loss("sizeless", num_classes=3, embedding_dim=4, scale=2.0)
    assert isinstance(loss, Sizeless) and loss.scale == 2.0
    ce = build_loss("cross_entropy", num_classes=3, embedding_dim=4)
    assert ce.head.weight.shape == (3, 4)


def test_register_twice_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("cross_entropy")(nn.Module)


def test_build_from_config_matches_factory():
    section = {"name": "cross_entropy", "label_smoothing": 0.0, "dropout": 0.0}
    loss = build_loss_from_config(section, num_classes=4, embedding_dim=6)
    assert loss.label_smoothing == 0.0 and loss.head.weight.shape == (4, 6)
    assert section["name"] == "cross_entropy"  # input not mutated
    value = loss(torch.randn(3, 6), torch.tensor([0, 1, 3]))
    assert torch.isfinite(value)


@pytest.mark.parametrize("section, message", [
    ({"name": "contrastiv"}, "unknown loss 'contrastiv'"),
    ({"name": "cross_entropy", "marign": 1}, "unknown parameter 'marign' for loss 'cross_entropy' (known: "),
    ({"name": "cross_entropy", "num_classes": 3}, "set by the engine"),
    ({"name": "cross_entropy", "label_smoothing": 2.0}, "label_smoothing"),
    ({"label_smoothing": 0.1}, "missing 'name'"),
])
def test_validation_errors_are_one_line(section, message):
    with pytest.raises(ValueError) as info:
        validate_loss_params(section)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_validation_accepts_good_section():
    validate_loss_params({"name": "cross_entropy", "label_smoothing": 0.1, "temperature": 0.5})
