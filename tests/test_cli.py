"""Command-line conventions: config show, repeated --config, `~key`, switching loss, list, --version, --help,
the contact sheet's hit marks, and user-facing wording in the docs."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

import unidml
from unidml.launcher.cli import main

REPO = Path(__file__).resolve().parents[1]


def _show(capsys, *args: str) -> dict:
    assert main(["config", "show", *args]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_config_show_prints_defaults_and_composes_files_left_to_right(capsys, tmp_path):
    defaults = _show(capsys)
    assert defaults["eval"]["split"] == "val" and defaults["data"]["val_classes"] == 0.2
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("train: {lr: 0.5, epochs: 3}\n")
    second.write_text("train: {lr: 0.1}\n")
    cfg = _show(capsys, "--config", str(first), "--config", str(second), "train.batch_size=16")
    assert cfg["train"]["lr"] == 0.1 and cfg["train"]["epochs"] == 3 and cfg["train"]["batch_size"] == 16
    cfg = _show(capsys, "--config", str(second), "--config", str(first))
    assert cfg["train"]["lr"] == 0.5


def test_tilde_deletes_a_loss_parameter_or_restores_a_schema_default(capsys):
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    cfg = _show(capsys, "--config", quickstart, "~loss.label_smoothing", "~train.lr")
    assert "label_smoothing" not in cfg["loss"] and cfg["loss"]["dropout"] == 0.0
    assert cfg["train"]["lr"] == _show(capsys)["train"]["lr"] != 0.1  # the schema default, not the recipe's
    assert main(["config", "show", "~train.nope"]) == 2
    assert capsys.readouterr().err.strip() == "unidml: error: override '~train.nope': no key 'train.nope' to delete"


def test_switching_loss_drops_the_previous_parameters_with_one_line(capsys, caplog):
    caplog.set_level(logging.WARNING, logger="unidml")
    cfg = _show(capsys, "--config", str(REPO / "configs" / "quickstart.yaml"), "loss.name=triplet", "loss.margin=0.3")
    assert cfg["loss"] == {"name": "triplet", "margin": 0.3}
    notices = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "'cross_entropy'" in notices[0] and "label_smoothing, dropout" in notices[0]
    caplog.clear()
    _show(capsys, "loss.name=cross_entropy")  # same loss: nothing dropped, nothing said
    assert not [r for r in caplog.records if "replaces" in r.getMessage()]


def test_version_help_and_lists(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"unidml {unidml.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "retrieval" in text and "unidml.launcher" not in text and "module" not in text
    assert main(["list", "losses"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"^triplet\s+Triplet margin loss", listed, re.M) and "margin=0.05" in listed
    assert main(["list", "datasets"]) == 0
    assert {"sop", "inshop", "cub", "cars", "list", "folder", "synthetic"} <= {
        line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert main(["list", "backbones"]) == 0
    assert "resnet50" in capsys.readouterr().out.split()


@pytest.mark.parametrize("what, key", [("samplers", "data.sampler"), ("poolings", "model.pooling"),
                                       ("data-backends", "data.backend"), ("engine-backends", "engine.backend")])
def test_list_prints_each_registry_as_the_config_accepts_it(what, key, capsys):
    from omegaconf import OmegaConf

    from unidml import registry
    from unidml.run_config import load_run_config

    assert main(["list", what]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list(registry.choices(key))
    # every listed name is one the config takes (with what it needs: a class token, a DeepSpeed JSON)
    needs = {"cls": ["model.arch=timm/vit_tiny_patch16_224", "model.pretrained=''", "data.image_size=32",
                     "data.resize_size=32"], "deepspeed": ["engine.deepspeed_config=configs/deepspeed/zero1.json"]}
    for name in names:
        assert OmegaConf.select(load_run_config(None, [f"{key}={name}", *needs.get(name, [])]), key) == name


def test_contact_sheet_frames_correct_hits_green_and_wrong_ones_red(tmp_path):
    from unidml.evaluation.contact_sheet import CORRECT, MARGIN, WRONG, Hit, write_contact_sheet

    image = tmp_path / "grey.png"
    Image.new("RGB", (20, 20), (128, 128, 128)).save(image)
    hits = [Hit(str(image), "cos 0.9", True), Hit(str(image), "cos 0.8", False), Hit(str(image), "cos 0.7")]
    out = write_contact_sheet(str(image), hits, tmp_path / "sheet.png", thumb=40, columns=4)
    cell = 40 + 2 * MARGIN
    with Image.open(out) as sheet:  # the frame's left edge, 2 px outside each tile
        frames = [sheet.getpixel((i * cell + MARGIN - 2, MARGIN + 20)) for i in range(4)]
    assert frames[1] == CORRECT and frames[2] == WRONG and frames[3] == (255, 255, 255)  # unknown: no frame


def test_docs_speak_to_users():
    """The product's docs, recipes and scripts are written for its users, not about how it was built."""
    words = re.compile(r"\b(sessions?|the lead|lead's|acceptance)\b", re.I)
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "configs").rglob("*.yaml"),
             *(REPO / "bench").glob("*")]
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in files if p.is_file()
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if words.search(line)]
    assert not found, "\n".join(found)
