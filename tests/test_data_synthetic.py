"""The built-in synthetic dataset: SOP layout, determinism, real JPEGs, CLI and argument errors."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torchvision.io
from PIL import Image

from unidml.data_pipeline.synthetic import class_specs, generate_dataset
from unidml.errors import UserError
from unidml.launcher import cli

SMALL = dict(classes=5, per_class=3, size=24, seed=3, test_fraction=0.4)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_list(path: Path) -> tuple[str, list[tuple[int, int, int, str]]]:
    header, *rows = path.read_text().splitlines()
    return header, [(int(a), int(b), int(c), d) for a, b, c, d in (row.split() for row in rows)]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", **SMALL)


def test_sop_list_files(small: Path) -> None:
    header_train, train = read_list(small / "Ebay_train.txt")
    header_test, test = read_list(small / "Ebay_test.txt")
    assert header_train == header_test == "image_id class_id super_class_id path"
    # 5 classes, test fraction 0.4 -> classes 1..3 train, 4..5 test; 3 images each
    assert sorted({row[1] for row in train}) == [1, 2, 3]
    assert sorted({row[1] for row in test}) == [4, 5]
    assert len(train) == 9 and len(test) == 6
    ids = [row[0] for row in train + test]
    assert sorted(ids) == list(range(1, 16))
    for class_id in range(1, 6):
        assert sum(row[1] == class_id for row in train + test) == 3
    specs = class_specs(5, SMALL["seed"])
    for _image_id, class_id, super_id, rel in train + test:
        assert super_id == specs[class_id - 1].super_class >= 1
        assert not Path(rel).is_absolute() and ".." not in Path(rel).parts
        assert (small / rel).is_file()
    assert len(list((small / "images").rglob("*.jpg"))) == 15


def test_images_are_real_jpegs_of_requested_size(small: Path) -> None:
    _, rows = read_list(small / "Ebay_train.txt")
    for _, _, _, rel in rows:
        with Image.open(small / rel) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (24, 24)
        data = torchvision.io.read_file(str(small / rel))
        assert torchvision.io.decode_jpeg(data).shape == (3, 24, 24)
    pixels = [np.asarray(Image.open(small / rel), dtype=np.float32) for *_, rel in rows]
    assert min(float(p.std()) for p in pixels) > 5.0  # not blank
    assert float(np.abs(pixels[0] - pixels[1]).mean()) > 5.0  # instances of a class differ


def test_deterministic_and_seed_dependent(small: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", **SMALL, workers=1)  # serial vs pooled: same bytes
    assert tree_digest(again) == tree_digest(small)
    other = generate_dataset(tmp_path / "other", **{**SMALL, "seed": 4})
    differing = [k for k, v in tree_digest(other).items() if k.endswith(".jpg") and tree_digest(small)[k] != v]
    assert len(differing) == 15


def test_class_specs_distinct_and_fine_grained() -> None:
    specs = class_specs(200, 0)
    attrs = np.array([[s.shape, s.layout, s.body_hue, s.part_hue, s.texture] for s in specs])
    assert len({tuple(a) for a in attrs}) == 200
    assert np.all(attrs[:, 2] != attrs[:, 3])
    differing = (attrs[:, None] != attrs[None]).sum(-1) + 99 * np.eye(200, dtype=int)
    assert np.mean(differing.min(1) <= 2) > 0.9  # most classes have a neighbour one or two details away
    assert class_specs(200, 0) == specs and class_specs(200, 1) != specs


def test_existing_targets(small: Path, tmp_path: Path) -> None:
    before = tree_digest(small)
    assert generate_dataset(small, **SMALL) == small and tree_digest(small) == before  # same params: kept
    regenerated = generate_dataset(small, **{**SMALL, "per_class": 2})  # other params: replaced
    assert len(read_list(regenerated / "Ebay_train.txt")[1]) == 6
    (tmp_path / "empty").mkdir()
    assert tree_digest(generate_dataset(tmp_path / "empty", **SMALL)) == before  # an empty directory is filled
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate_dataset(tmp_path / "foreign", **SMALL)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left behind


@pytest.fixture
def synth_cli(monkeypatch: pytest.MonkeyPatch):
    """`cli.main` with only the `data synth` command registered (the other commands are other areas')."""
    monkeypatch.setattr(cli, "COMMANDS", tuple(c for c in cli.COMMANDS if c[0] == "data synth"))
    return cli.main


def test_cli_end_to_end(synth_cli, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert synth_cli(["data", "synth", "--out", str(out), "--classes", "4", "--per-class", "2",
                      "--size", "16", "--seed", "1", "--test-fraction", "0.5"]) == 0
    summary = capsys.readouterr().out.strip()
    assert "train 2 classes / 4 images" in summary and "test 2 classes / 4 images" in summary and str(out) in summary
    assert tree_digest(out) == tree_digest(generate_dataset(tmp_path / "api", 4, 2, 16, 1, 0.5))


@pytest.mark.parametrize("args, message", [
    (["--classes", "1"], "--classes 1"),
    (["--size", "8"], "--size 8"),
    (["--per-class", "1"], "--per-class 1"),
    (["--test-fraction", "1.0"], "--test-fraction 1.0"),
])
def test_cli_bad_arguments(synth_cli, tmp_path: Path, capsys: pytest.CaptureFixture, args, message) -> None:
    assert synth_cli(["data", "synth", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unidml: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_file_target(synth_cli, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert synth_cli(["data", "synth", "--out", str(target), "--classes", "2", "--per-class", "2"]) == 2
    assert "not a directory" in capsys.readouterr().err
