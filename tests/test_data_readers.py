"""Dataset readers: counts, labels, splits (docs/design.md, "Datasets") and one-line errors on bad index files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_data_fixtures import make_cars, make_cub, make_inshop, make_sop, write_jpeg

from unidml.config import DataConfig, SyntheticConfig
from unidml.data_pipeline import build_dataset
from unidml.data_pipeline.readers import read_dataset
from unidml.data_pipeline.splits import carve_validation
from unidml.errors import UserError


def _cfg(**kw):
    """A data section; no validation split unless asked (the default carves one)."""
    return OmegaConf.structured(DataConfig(**{"val_classes": 0.0, **kw}))


def test_sop_labels_are_class_id_minus_one(tmp_path):
    make_sop(tmp_path, train_classes=4, test_classes=3, per_class=3)
    ds = read_dataset("sop", tmp_path)
    assert set(ds.splits) == {"train", "test"} and ds.eval_pairs == {"test": ("test", None)}
    assert ds.train.labels.tolist() == [c for c in range(4) for _ in range(3)]
    assert ds.splits["test"].labels.tolist() == [c for c in range(4, 7) for _ in range(3)]
    assert ds.train.paths[0] == str(tmp_path / "class001_final" / "1_0.JPG")
    assert ds.splits["test"].contiguous_labels().tolist() == [c for c in range(3) for _ in range(3)]


def test_inshop_items_map_to_contiguous_labels_over_the_whole_file(tmp_path):
    make_inshop(tmp_path)
    ds = read_dataset("inshop", tmp_path)
    assert ds.eval_pairs == {"test": ("query", "gallery")}
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "query": 2, "gallery": 4}
    # items id_00000000, id_00000001 (eval) sort before id_00000010.. (train)
    assert ds.splits["query"].labels.tolist() == [0, 1]
    assert ds.splits["gallery"].labels.tolist() == [0, 0, 1, 1]
    assert ds.train.labels.tolist() == [2, 2, 3, 3, 4, 4]
    assert ds.train.paths[0].endswith("img/MEN/Tees/id_00000010/00_1_front.jpg")


def test_cub_splits_classes_0_99_train_100_199_test(tmp_path):
    make_cub(tmp_path, classes=(1, 2, 100, 101, 200), per_class=2)
    ds = read_dataset("cub", tmp_path)
    assert ds.train.labels.tolist() == [0, 0, 1, 1, 99, 99]
    assert ds.splits["test"].labels.tolist() == [100, 100, 199, 199]
    assert ds.train.paths[0] == str(tmp_path / "images" / "001.Bird_1" / "Bird_1_0000.jpg")


def test_cars_splits_classes_0_97_train_and_ignores_the_test_flag(tmp_path):
    make_cars(tmp_path, classes=(1, 98, 99, 196), per_class=2)
    ds = read_dataset("cars", tmp_path)
    assert ds.train.labels.tolist() == [0, 0, 97, 97]
    assert ds.splits["test"].labels.tolist() == [98, 98, 195, 195]
    assert ds.train.paths[:2] == (str(tmp_path / "car_ims" / "000001.jpg"), str(tmp_path / "car_ims" / "000002.jpg"))


def test_list_with_split_column_and_string_labels(tmp_path):
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]):
        write_jpeg(tmp_path / name, i)
    (tmp_path / "list.csv").write_text("path,label,split\na.jpg,cat,train\nb.jpg,dog,train\n"
                                       "c.jpg,eel,test\nd.jpg,eel,test\n")
    ds = build_dataset(_cfg(dataset="list", root=str(tmp_path), list_file="list.csv"))
    assert ds.train.labels.tolist() == [0, 1] and ds.splits["test"].labels.tolist() == [2, 2]
    assert ds.eval_pairs == {"test": ("test", None)}


def test_list_tsv_without_split_halves_the_classes(tmp_path):
    rows = [f"img{i}.jpg\t{label}" for i, label in enumerate([5, 5, 7, 9, 9, 11])]
    (tmp_path / "l.tsv").write_text("\n".join(rows) + "\n")
    ds = read_dataset("list", tmp_path, "l.tsv")
    assert ds.train.labels.tolist() == [5, 5, 7] and ds.splits["test"].labels.tolist() == [9, 9, 11]


def test_folder_one_directory_per_class_derives_a_test_split_and_says_so(tmp_path):
    for name in ("ant", "bee", "cat", "dog"):
        for k in range(2):
            write_jpeg(tmp_path / name / f"{k}.jpg", k)
    (tmp_path / "bee" / "notes.txt").write_text("ignored")
    ds = read_dataset("folder", tmp_path)
    assert ds.train.labels.tolist() == [0, 0, 1, 1] and ds.splits["test"].labels.tolist() == [2, 2, 3, 3]
    assert len(ds.notes) == 1 and "\n" not in ds.notes[0]
    assert "no test split given" in ds.notes[0] and "last 2 of 4 classes" in ds.notes[0]


def _tree(root: Path, layout: dict[str, tuple[str, ...]], per_class: int = 2) -> None:
    for split, classes in layout.items():
        for c in classes:
            for k in range(per_class):
                write_jpeg(root / split / c / f"{k}.jpg", len(c), k, size=(8, 8))


def test_folder_split_by_train_val_test_folders_keeps_one_label_per_class_name(tmp_path):
    _tree(tmp_path, {"train": ("ant", "bee"), "val": ("cat",), "test": ("bee", "dog")})
    ds = build_dataset(_cfg(dataset="folder", root=str(tmp_path), val_classes=0.5))
    assert {k: (len(v), v.num_classes) for k, v in ds.splits.items()} == {"train": (4, 2), "val": (2, 1),
                                                                          "test": (4, 2)}
    assert ds.train.labels.tolist() == [0, 0, 1, 1] and ds.splits["test"].labels.tolist() == [1, 1, 3, 3]
    assert ds.eval_pairs == {"test": ("test", None), "val": ("val", None)}
    assert ds.notes == ("validation split: the dataset's own (1 classes); data.val_classes unused",)


def test_folder_with_train_folder_only_derives_test_from_its_classes(tmp_path):
    _tree(tmp_path, {"train": ("a", "b", "c")})
    ds = read_dataset("folder", tmp_path)
    assert ds.train.labels.tolist() == [0, 0, 1, 1] and ds.splits["test"].labels.tolist() == [2, 2]
    assert "no test split given" in ds.notes[0]


def test_list_of_absolute_paths_without_root_and_relative_paths_next_to_the_list(tmp_path):
    images = [write_jpeg(tmp_path / "imgs" / f"{i}.jpg", i) for i in range(4)]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "abs.csv").write_text("".join(f"{p},{i // 2}\n" for i, p in enumerate(images)))
    ds = read_dataset("list", None, str(tmp_path / "lists" / "abs.csv"))
    assert ds.train.paths == (str(images[0]), str(images[1])) and ds.splits["test"].paths == tuple(map(str, images[2:]))
    (tmp_path / "lists" / "rel.csv").write_text("../imgs/0.jpg,0,train\n../imgs/1.jpg,1,train\n../imgs/2.jpg,1,val\n"
                                                "../imgs/3.jpg,2,test\n")
    ds = read_dataset("list", "", str(tmp_path / "lists" / "rel.csv"))
    assert ds.splits["val"].paths == (str(images[2]),) and ds.splits["test"].paths == (str(images[3]),)
    assert ds.eval_pairs == {"test": ("test", None), "val": ("val", None)} and ds.notes == ()


def test_list_absolute_paths_inside_a_given_root_pass_and_outside_it_are_refused(tmp_path):
    inside = write_jpeg(tmp_path / "root" / "a.jpg")
    outside = write_jpeg(tmp_path / "elsewhere" / "b.jpg")
    (tmp_path / "root" / "in.csv").write_text(f"{inside},0\n{inside},1\n")
    assert read_dataset("list", tmp_path / "root", "in.csv").train.paths == (str(inside),)
    (tmp_path / "root" / "out.csv").write_text(f"{inside},0\n{outside},1\n")
    with pytest.raises(UserError, match=rf"out.csv:2: path '{outside}' escapes the dataset root") as info:
        read_dataset("list", tmp_path / "root", "out.csv")
    assert "\n" not in str(info.value)


def test_symlinks_leading_outside_the_root_are_refused(tmp_path):
    """A symlinked file or folder inside the root that resolves outside it is an escape (the check is on
    the real path); a symlink that stays inside the root is fine."""
    secret = write_jpeg(tmp_path / "secret" / "s.jpg")
    root = tmp_path / "root"
    _tree(root, {"": ("a", "b")})
    (root / "a" / "own.jpg").symlink_to(root / "b" / "0.jpg")  # stays inside: accepted
    assert len(read_dataset("folder", root).train) == 3
    (root / "a" / "link.jpg").symlink_to(secret)
    with pytest.raises(UserError, match=r"path 'a/link.jpg' escapes the dataset root .* \(a symlink to .*s.jpg\)"):
        read_dataset("folder", root)
    (root / "a" / "link.jpg").unlink()
    (root / "b" / "linked_dir").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(UserError, match=r"path 'b/linked_dir' escapes the dataset root"):
        read_dataset("folder", root)
    make_sop(tmp_path / "sop", train_classes=2, test_classes=2, per_class=1, size=(8, 8))
    (tmp_path / "sop" / "class001_final" / "1_0.JPG").unlink()
    (tmp_path / "sop" / "class001_final" / "1_0.JPG").symlink_to(secret)
    with pytest.raises(UserError, match=r"Ebay_train.txt:2: path 'class001_final/1_0.JPG' escapes .* symlink"):
        read_dataset("sop", tmp_path / "sop")


def test_a_folder_link_loop_is_walked_once(tmp_path):
    _tree(tmp_path, {"": ("a", "b")})
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    assert len(read_dataset("folder", tmp_path).train) == 2


def test_only_a_list_may_go_without_root():
    with pytest.raises(UserError, match=r"data.root: required for data.dataset=cub"):
        read_dataset("cub", "")


@pytest.mark.parametrize("content, expected", [
    ("image_id class_id super_class_id path\n1 1 1 a.jpg\n2 x 1 b.jpg\n",
     r"Ebay_train.txt:3: malformed line.*class_id 'x'"),
    ("image_id class_id super_class_id path\n1 1 1\n", r"Ebay_train.txt:2: malformed line: expected 4 columns"),
    ("image_id class_id super_class_id path\n1 1 1 ../../etc/passwd\n",
     r"Ebay_train.txt:2: path '\.\./\.\./etc/passwd' escapes"),
    ("image_id class_id super_class_id path\n1 1 1 /etc/passwd\n", r"Ebay_train.txt:2: path '/etc/passwd' escapes"),
])
def test_sop_bad_index_lines_name_file_and_line(tmp_path, content, expected):
    (tmp_path / "Ebay_train.txt").write_text(content)
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")
    with pytest.raises(UserError, match=expected):
        read_dataset("sop", tmp_path)


@pytest.mark.parametrize("kind, missing", [("sop", "Ebay_train.txt"), ("inshop", "list_eval_partition.txt"),
                                           ("cub", "images.txt"), ("cars", "cars_annos.mat")])
def test_missing_index_file_is_named(tmp_path, kind, missing):
    with pytest.raises(UserError, match=rf"{missing}: file not found"):
        read_dataset(kind, tmp_path)


def test_inshop_bad_status_and_cars_non_mat_file(tmp_path):
    (tmp_path / "list_eval_partition.txt").write_text("1\nimage_name item_id evaluation_status\nimg/a.jpg id_1 val\n")
    with pytest.raises(UserError, match=r"list_eval_partition.txt:3: malformed line"):
        read_dataset("inshop", tmp_path)
    (tmp_path / "cars_annos.mat").write_text("not a mat file")
    with pytest.raises(UserError, match=r"cars_annos.mat: "):
        read_dataset("cars", tmp_path)


def test_validation_split_is_class_disjoint_and_seeded(tmp_path):
    make_sop(tmp_path, train_classes=10, test_classes=2, per_class=2, size=(8, 8))
    ds = build_dataset(_cfg(dataset="sop", root=str(tmp_path), val_classes=0.3), seed=1)
    train, val = ds.train, ds.splits["val"]
    assert val.num_classes == 3 and train.num_classes == 7
    assert not set(train.classes) & set(val.classes)
    assert len(train) + len(val) == 20 and ds.eval_pairs["val"] == ("val", None)
    base = read_dataset("sop", tmp_path)
    assert np.array_equal(carve_validation(base, 0.3, seed=1).splits["val"].classes, val.classes)
    others = [carve_validation(base, 0.3, seed=s).splits["val"].classes for s in range(2, 6)]
    assert any(not np.array_equal(o, val.classes) for o in others)


def test_synthetic_refuses_a_folder_holding_another_dataset(tmp_path):
    make_sop(tmp_path, train_classes=2, test_classes=2, per_class=2, size=(8, 8))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match="no synthetic dataset") as info:
        build_dataset(_cfg(dataset="synthetic", root=str(tmp_path)))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing touched


def test_synthetic_reuses_an_identical_tree_and_regenerates_a_stale_one(tmp_path):
    params = dict(classes=4, per_class=3, size=16, seed=0, test_fraction=0.5)
    cfg = _cfg(dataset="synthetic", root=str(tmp_path / "syn"), synthetic=SyntheticConfig(**params))
    build_dataset(cfg)
    marker = tmp_path / "syn" / "synthetic.json"
    stamp = marker.stat().st_mtime_ns
    assert len(build_dataset(cfg).train) == 6 and marker.stat().st_mtime_ns == stamp  # reused as is
    bigger = _cfg(dataset="synthetic", root=str(tmp_path / "syn"),
                  synthetic=SyntheticConfig(**{**params, "per_class": 4}))
    assert len(build_dataset(bigger).train) == 8  # parameters changed: regenerated


def test_synthetic_generates_when_absent(tmp_path):
    cfg = _cfg(dataset="synthetic", root=str(tmp_path / "syn"),
               synthetic=SyntheticConfig(classes=4, per_class=3, size=16, seed=0, test_fraction=0.5))
    ds = build_dataset(cfg)
    assert (tmp_path / "syn" / "Ebay_train.txt").is_file()
    assert len(ds.train) + len(ds.splits["test"]) == 12
    assert not set(ds.train.classes) & set(ds.splits["test"].classes)
    assert all(Path(p).is_file() for p in ds.train.paths)
