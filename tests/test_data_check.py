"""`unidml data check` on fixture trees of the four original formats, with bad files."""
from __future__ import annotations

import json

import pytest
from test_data_fixtures import make_cars, make_cub, make_inshop, make_sop, write_odd

from unidml.launcher.cli import main


def _check(capsys, *args: str) -> tuple[int, str]:
    code = main(["data", "check", *args])
    return code, capsys.readouterr().out


def _json(capsys, kind: str, root) -> tuple[int, dict]:
    code, out = _check(capsys, "--dataset", kind, "--root", str(root), "--json", "--workers", "2")
    return code, json.loads(out)


@pytest.mark.parametrize("kind, make, expected", [
    ("sop", make_sop, {"train": (12, 4), "test": (9, 3)}),
    ("inshop", make_inshop, {"train": (6, 3), "query": (2, 2), "gallery": (4, 2)}),
    ("cub", make_cub, {"train": (6, 3), "test": (4, 2)}),
    ("cars", make_cars, {"train": (4, 2), "test": (4, 2)}),
])
def test_clean_trees_summarise_splits(capsys, tmp_path, kind, make, expected):
    make(tmp_path)
    code, report = _json(capsys, kind, tmp_path)
    assert code == 0 and report["problems"] == [] and report["usable"]
    assert {k: (v["images"], v["classes"]) for k, v in report["splits"].items()} == expected


def test_bad_files_are_listed_and_oddities_counted(capsys, tmp_path):
    make_cub(tmp_path, classes=(1, 2, 150, 151), per_class=3)
    images = tmp_path / "images"
    write_odd(images / "001.Bird_1/Bird_1_0000.jpg", "zero")
    write_odd(images / "001.Bird_1/Bird_1_0001.jpg", "truncated")
    write_odd(images / "002.Bird_2/Bird_2_0000.jpg", "text")
    write_odd(images / "150.Bird_150/Bird_150_0000.jpg", "garbage")
    (images / "151.Bird_151/Bird_151_0002.jpg").unlink()
    write_odd(images / "002.Bird_2/Bird_2_0001.jpg", "cmyk")
    write_odd(images / "002.Bird_2/Bird_2_0002.jpg", "png_as_jpg")
    write_odd(images / "151.Bird_151/Bird_151_0000.jpg", "gray")
    code, report = _json(capsys, "cub", tmp_path)
    kinds = {p["path"].split("images/")[1]: p["kind"] for p in report["problems"]}
    assert kinds == {"001.Bird_1/Bird_1_0000.jpg": "zero_byte", "001.Bird_1/Bird_1_0001.jpg": "unreadable",
                     "002.Bird_2/Bird_2_0000.jpg": "unreadable", "150.Bird_150/Bird_150_0000.jpg": "unreadable",
                     "151.Bird_151/Bird_151_0002.jpg": "missing"}
    assert report["converted_to_rgb"] == 3 and code == 0  # bad images alone: usable with on_error=skip
    assert report["splits"]["train"] == {"images": 6, "classes": 2, "readable": 3,
                                         "images_per_class": {"min": 3, "median": 3.0, "max": 3}}
    code, _ = _check(capsys, "--dataset", "cub", "--root", str(tmp_path), "--strict")
    assert code == 1


def test_escaping_paths_make_the_tree_unusable(capsys, tmp_path):
    make_sop(tmp_path / "sop")
    secret = write_odd(tmp_path / "outside.jpg", "gray")
    index = tmp_path / "sop" / "Ebay_test.txt"
    index.write_text(index.read_text() + "99 7 1 ../outside.jpg\n")
    code, report = _json(capsys, "sop", tmp_path / "sop")
    assert code == 1 and not report["usable"]
    assert [(p["path"], p["kind"]) for p in report["problems"]] == [(str(secret), "escapes_root")]
    assert "Ebay_test.txt:11" in report["problems"][0]["detail"]


def test_index_errors_and_text_summary(capsys, tmp_path):
    make_sop(tmp_path)
    code, out = _check(capsys, "--dataset", "sop", "--root", str(tmp_path))
    assert code == 0 and "status: usable" in out
    assert out.splitlines()[2].split() == ["train", "12", "4", "12", "3/3/3"]
    (tmp_path / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 one 1 a.jpg\n")
    code, out = _check(capsys, "--dataset", "sop", "--root", str(tmp_path))
    assert code == 1 and "Ebay_train.txt:2: malformed line" in out and "status: NOT usable" in out
