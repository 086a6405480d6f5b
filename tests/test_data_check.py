"""`unidml data check` on fixture trees of the four original formats, with bad files."""
from __future__ import annotations

import json

import pytest
from test_data_fixtures import make_cars, make_cub, make_inshop, make_sop, write_jpeg, write_odd
from test_faults_fixtures import write_bomb

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


def test_symlinks_leading_outside_the_root_are_escapes(capsys, tmp_path):
    """Containment is decided on the real path: a symlinked file or folder inside the root that
    points outside is an escape (never opened); a symlink staying inside is fine."""
    root = make_sop(tmp_path / "sop")
    outside = write_jpeg(tmp_path / "elsewhere" / "secret.jpg")
    (root / "linked_file.jpg").symlink_to(outside)
    (root / "linked_dir").symlink_to(outside.parent, target_is_directory=True)
    (root / "inside_link.jpg").symlink_to(root / "class001_final/1_0.JPG")
    index = root / "Ebay_test.txt"
    index.write_text(index.read_text() + "90 7 1 linked_file.jpg\n91 7 1 linked_dir/secret.jpg\n"
                                          "92 7 1 inside_link.jpg\n")
    code, report = _json(capsys, "sop", root)
    escapes = sorted((p["path"].split("sop/")[1], p["detail"])
                     for p in report["problems"] if p["kind"] == "escapes_root")
    assert code == 1 and not report["usable"]
    assert [e[0] for e in escapes] == ["linked_dir/secret.jpg", "linked_file.jpg"]
    for (_, detail), line in zip(escapes, (12, 11)):
        assert f"Ebay_test.txt:{line} (a symlink to {outside})" in detail
    # the in-root symlink is a second name for a train image: a duplicate, not an escape
    duplicates = [p for p in report["problems"] if p["kind"] == "duplicate"]
    assert [p["path"] for p in duplicates] == [str(root / "class001_final/1_0.JPG")]
    assert "splits: train, test" in duplicates[0]["detail"]


def test_duplicates_single_image_classes_and_oversized_images(capsys, tmp_path):
    root = make_sop(tmp_path, train_classes=3, test_classes=3, per_class=2)
    index = root / "Ebay_test.txt"
    lines = index.read_text().splitlines()
    lines.append(lines[1])  # the same line twice: same id, same file
    lines = [line for line in lines if not line.endswith("6_1.JPG")]  # class 6 keeps one image
    index.write_text("\n".join(lines) + "\n")
    write_bomb(root / "class002_final/2_0.JPG")
    code, report = _json(capsys, "sop", root)
    by_kind = {}
    for problem in report["problems"]:
        by_kind.setdefault(problem["kind"], []).append(problem)
    assert sorted(by_kind) == ["duplicate", "duplicate_id", "single_image_class", "too_large"]
    assert by_kind["duplicate"][0]["path"].endswith("class004_final/4_0.JPG")
    assert by_kind["duplicate_id"][0]["path"].endswith("Ebay_test.txt:7")
    assert "image id 7 already on" in by_kind["duplicate_id"][0]["detail"]
    assert "split 'test': 1 classes with a single image (labels 5)" in by_kind["single_image_class"][0]["detail"]
    assert "900000000 pixels" in by_kind["too_large"][0]["detail"]
    assert code == 0 and report["usable"]  # all of these leave the tree usable ...
    code, out = _check(capsys, "--dataset", "sop", "--root", str(root), "--strict")
    assert code == 1 and "too_large: " in out  # ... but not under --strict


def test_the_status_names_bad_images_and_empty_class_folders(capsys, tmp_path):
    """It said `status: usable` above a list of unreadable and oversized images, and nothing of a class
    folder without images (the reader skips it): the status line now counts each."""
    for name in ("cat", "dog", "owl"):
        for i in range(3):
            write_jpeg(tmp_path / name / f"{i}.jpg")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "notes.txt").write_text("no images here\n")
    write_odd(tmp_path / "cat" / "1.jpg", "truncated")
    write_odd(tmp_path / "dog" / "1.jpg", "zero")
    write_bomb(tmp_path / "owl" / "1.jpg")
    code, out = _check(capsys, "--dataset", "folder", "--root", str(tmp_path))
    assert code == 0 and out.splitlines()[-1] == (
        "status: usable with problems: 1 class folders without images, 1 too large, 1 unreadable, 1 empty "
        "(unreadable images are replaced in training and left out of evaluation; --strict fails on these)")
    assert f"empty_class: {tmp_path / 'empty_class'}: class folder 'empty_class' holds no image" in out
    code, report = _json(capsys, "folder", tmp_path)
    assert report["usable"] and report["status"].startswith("usable with problems: ")
    (tmp_path / "empty_class").rename(tmp_path / ".hidden")
    for name, i in (("cat", 1), ("dog", 1), ("owl", 1)):
        write_jpeg(tmp_path / name / f"{i}.jpg")
    code, out = _check(capsys, "--dataset", "folder", "--root", str(tmp_path))
    assert code == 0 and out.splitlines()[-1] == "status: usable"
