"""Adding a dataset reader, a backbone family or an engine backend takes one registration, from this file alone
(docs/design.md, "How to add a dataset reader / a backbone / a backend"; the loss is tests/test_losses_extension.py).

Each is registered for one test, then found by the config checks, the factories and the commands with no
other change, and the registry is left as it was.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from unidml import registry
from unidml.data_pipeline import build_dataset
from unidml.data_pipeline.readers import DatasetReader, read_folder
from unidml.engine.backends import build_backend
from unidml.models import Backbone, build_model
from unidml.models.registry import register_family
from unidml.run_config import load_run_config, register_components

register_components()


@pytest.fixture
def class_folders(tmp_path):
    """root/train/<class>/ and root/test/<class>/ with 3 classes of 4 tiny images each."""
    rng = np.random.default_rng(0)
    for split, classes in (("train", ("a", "b", "c")), ("test", ("d", "e", "f"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(4):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{index}.png")
    return tmp_path


@pytest.fixture
def scrapbook_reader(monkeypatch):
    """A dataset reader registered for one test: the class-folder layout under another name."""
    monkeypatch.setitem(registry.DATASETS, "scrapbook", DatasetReader(
        lambda root, list_file: read_folder(root), "class folders, for the extension test"))
    return "scrapbook"


def test_a_registered_reader_is_a_dataset_everywhere(class_folders, scrapbook_reader, capsys):
    from unidml.launcher import cli

    cfg = load_run_config(None, [f"data.dataset={scrapbook_reader}", f"data.root={class_folders}",
                                 "data.val_classes=0", "eval.split=test"])
    dataset = build_dataset(cfg.data)
    assert dataset.splits["train"].num_classes == 3 and len(dataset.splits["test"]) == 12
    assert cli.main(["data", "check", "--dataset", scrapbook_reader, "--root", str(class_folders)]) == 0
    assert "status: usable" in capsys.readouterr().out
    assert cli.main(["list", "datasets"]) == 0
    assert "class folders, for the extension test" in capsys.readouterr().out


class TinyFamily:
    """`model.arch: tiny/<width>`: two convolutions and feature maps of `width` channels."""

    prefix = "tiny/"

    def names(self) -> list[str]:
        return ["8", "16"]

    def check_name(self, name: str) -> None:
        if name not in self.names():
            raise ValueError(f"model.arch: tiny/{name} is not one of tiny/8, tiny/16")

    def build(self, name: str, model_cfg, image_size: int, load_weights: bool) -> Backbone:
        width = int(name)
        net = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        return Backbone(net, "maps", width, layer_of={n: int(n.split(".")[0]) for n, _ in net.named_parameters()})


@pytest.fixture
def tiny_family(monkeypatch):
    monkeypatch.setattr(registry.BACKBONE_FAMILIES, "_entries", dict(registry.BACKBONE_FAMILIES.items()))
    register_family("tiny/")(TinyFamily)
    return "tiny/16"


def test_a_registered_backbone_family_builds_checks_and_embeds(tiny_family):
    cfg = load_run_config(None, [f"model.arch={tiny_family}", "model.embedding_dim=8", "model.pretrained=''",
                                 "model.pooling=gem", "data.image_size=32", "data.resize_size=32"])
    model = build_model(cfg.model, cfg.data.image_size)
    embeddings = model(torch.rand(2, 3, 32, 32))
    assert embeddings.shape == (2, 8) and torch.isfinite(embeddings).all()
    with pytest.raises(Exception, match="model.pooling: 'cls' does not apply to 'tiny/16'"):
        load_run_config(None, [f"model.arch={tiny_family}", "model.pooling=cls", "model.pretrained=''"])


def test_a_registered_engine_backend_is_chosen_by_name(monkeypatch):
    calls = []

    def recording_backend(module, cfg, env, total_steps):
        calls.append((module, cfg.engine.backend, env, total_steps))
        return "the recording backend"

    monkeypatch.setitem(registry.ENGINE_BACKENDS, "recording", recording_backend)
    cfg = load_run_config(None, ["engine.backend=recording"])
    module = nn.Linear(2, 2)
    assert build_backend(module, cfg, "env", 7) == "the recording backend"
    assert calls == [(module, "recording", "env", 7)]
    monkeypatch.delitem(registry.ENGINE_BACKENDS, "recording")
    with pytest.raises(Exception, match="key 'engine.backend': 'recording' is not one of single, ddp, deepspeed"):
        load_run_config(None, ["engine.backend=recording"])
