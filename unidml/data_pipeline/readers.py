"""Readers for the original dataset layouts (docs/design.md, "Datasets") and two generic ones (a list file,
class folders).

Each reader turns a dataset tree into a `DatasetDescription` with absolute image paths and the
labels/splits docs/design.md fixes. Index-file problems (missing file, malformed line, a path escaping the
root, also through a symlink) raise `UserError` naming the file and line; image files themselves are
not opened here (the loaders apply `data.on_error`, and `unidml data check` inspects them).
"""
from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from unidml.data_pipeline.dataset import DatasetDescription, ImageSet
from unidml.errors import UserError
from unidml.registry import DATASETS

# Every image file the product reads (folder datasets, `unidml embed` and `unidml search` folders).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
CUB_TRAIN_CLASSES = 100  # classes 0..99 train, 100..199 test
CARS_TRAIN_CLASSES = 98  # classes 0..97 train, 98..195 test
SELF_RETRIEVAL = {"test": ("test", None)}


_escapes: ContextVar[list[tuple[str, str]] | None] = ContextVar("escapes", default=None)


@contextmanager
def collecting_escapes() -> Iterator[list[tuple[str, str]]]:
    """Within this block readers record paths escaping the root as (path, where) instead of raising
    (for `unidml data check`, which reports every one and never opens them)."""
    found: list[tuple[str, str]] = []
    token = _escapes.set(found)
    try:
        yield found
    finally:
        _escapes.reset(token)


def resolve_inside(root: Path | None, relpath: str, where: str, hint: str = "") -> str:
    """Absolute path of `relpath` (relative to `root`, or absolute) that must stay inside `root`.

    Containment is checked on the resolved real path: `..`, absolute paths and symlinks (to a file, or a
    linked folder on the way) that lead outside the root are refused with a `UserError` naming `where`.
    With `root=None` (a list file used without `data.root`) an absolute path is taken as it is. The
    lexical path (what the index names) is returned; it is what the loaders open. `hint` ends the error line.
    """
    if root is None:
        return os.path.abspath(relpath)
    base = os.path.realpath(root)
    full = os.path.normpath(os.path.join(os.path.abspath(root), relpath))
    real = os.path.realpath(full)
    if os.path.commonpath([base, real]) != base:
        linked = os.path.commonpath([os.path.abspath(root), full]) == os.path.abspath(root)
        detail = f" (a symlink to {real})" if linked else ""
        found = _escapes.get()
        if found is None:
            raise UserError(f"{where}: path '{relpath}' escapes the dataset root {base}{detail}{hint}")
        found.append((full, where + detail))
    return full


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    return path


def _lines(path: Path, skip: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, whitespace-split fields) of the non-blank lines after `skip` lines."""
    with open(_require_file(path), encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if number > skip and line.strip():
                yield number, line.split()


def _int_field(value: str, path: Path, number: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{path}:{number}: malformed line: {what} '{value}' is not an integer") from None


def _image_set(name: str, paths: list[str], labels: list[int]) -> ImageSet:
    return ImageSet(name, tuple(paths), np.asarray(labels, dtype=np.int64).reshape(-1))


def _split_by_class(paths: list[str], labels: list[int], is_train: Callable[[int], bool]) -> dict[str, ImageSet]:
    """Class-disjoint train/test split by a predicate on the label."""
    train = [i for i, label in enumerate(labels) if is_train(label)]
    test = [i for i, label in enumerate(labels) if not is_train(label)]
    return {
        "train": _image_set("train", [paths[i] for i in train], [labels[i] for i in train]),
        "test": _image_set("test", [paths[i] for i in test], [labels[i] for i in test]),
    }


def read_sop(root: Path, name: str = "sop") -> DatasetDescription:
    """Stanford Online Products: `Ebay_{train,test}.txt`, label = class_id - 1."""
    splits = {}
    for split in ("train", "test"):
        index = root / f"Ebay_{split}.txt"
        paths, labels = [], []
        for number, fields in _lines(index, skip=1):
            if len(fields) != 4:
                raise UserError(f"{index}:{number}: malformed line: expected 4 columns "
                                f"(image_id class_id super_class_id path), got {len(fields)}")
            labels.append(_int_field(fields[1], index, number, "class_id") - 1)
            paths.append(resolve_inside(root, fields[3], f"{index}:{number}"))
        splits[split] = _image_set(split, paths, labels)
    return DatasetDescription(name, root, splits, dict(SELF_RETRIEVAL))


def read_inshop(root: Path) -> DatasetDescription:
    """In-Shop: `list_eval_partition.txt`; item ids mapped to contiguous ints over the whole file."""
    index = root / "list_eval_partition.txt"
    rows: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in ("train", "query", "gallery")}
    for number, fields in _lines(index, skip=2):
        if len(fields) != 3 or fields[2] not in rows:
            raise UserError(f"{index}:{number}: malformed line: expected 'image_name item_id "
                            f"evaluation_status' with status train|query|gallery")
        rows[fields[2]][0].append(resolve_inside(root, fields[0], f"{index}:{number}"))
        rows[fields[2]][1].append(fields[1])
    items = sorted({item for _, ids in rows.values() for item in ids})
    label_of = {item: label for label, item in enumerate(items)}
    splits = {s: _image_set(s, paths, [label_of[i] for i in ids]) for s, (paths, ids) in rows.items()}
    return DatasetDescription("inshop", root, splits, {"test": ("query", "gallery")})


def read_cub(root: Path) -> DatasetDescription:
    """CUB-200-2011: `images.txt` ("id relpath" under `images/`), label = folder prefix NNN - 1."""
    index = root / "images.txt"
    paths, labels = [], []
    for number, fields in _lines(index):
        if len(fields) != 2 or "/" not in fields[1]:
            raise UserError(f"{index}:{number}: malformed line: expected 'image_id NNN.Class/file.jpg'")
        prefix = fields[1].split("/", 1)[0].split(".", 1)[0]
        labels.append(_int_field(prefix, index, number, "class folder prefix") - 1)
        paths.append(resolve_inside(root / "images", fields[1], f"{index}:{number}"))
    return DatasetDescription("cub", root, _split_by_class(paths, labels, lambda c: c < CUB_TRAIN_CLASSES),
                              dict(SELF_RETRIEVAL))


def read_cars(root: Path) -> DatasetDescription:
    """Cars196: `cars_annos.mat` annotations (relative_im_path, class 1..196); the test flag is ignored."""
    from scipy.io import loadmat

    index = _require_file(root / "cars_annos.mat")
    try:
        annotations = loadmat(str(index), squeeze_me=True)["annotations"]
        records = np.atleast_1d(annotations)
        relpaths = [str(r["relative_im_path"]) for r in records]
        classes = [int(r["class"]) for r in records]
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise UserError(f"{index}: malformed annotations ({type(exc).__name__}: {exc}); expected a struct "
                        f"array 'annotations' with fields relative_im_path and class") from None
    except Exception as exc:  # scipy raises assorted errors on a file that is not a MAT file
        raise UserError(f"{index}: not a readable MAT file ({type(exc).__name__}: {exc})") from None
    paths = [resolve_inside(root, p, f"{index}: annotation {i + 1}") for i, p in enumerate(relpaths)]
    labels = [c - 1 for c in classes]
    return DatasetDescription("cars", root, _split_by_class(paths, labels, lambda c: c < CARS_TRAIN_CLASSES),
                              dict(SELF_RETRIEVAL))


def _labels_to_ints(raw: list[str]) -> list[int]:
    """Integer labels as given; any non-integer label maps all labels to their sorted-name index."""
    try:
        return [int(v) for v in raw]
    except ValueError:
        names = {name: i for i, name in enumerate(sorted(set(raw)))}
        return [names[v] for v in raw]


def derive_test_split(images: ImageSet, source: str) -> tuple[ImageSet, ImageSet, str]:
    """(train, test, note): the class-disjoint split a dataset without a test split gets.

    The sorted classes are cut in half, the first half trains and the second half is the test set (as in
    CUB-200 and Cars196); `note` is the one line that announces it.
    """
    classes = images.classes
    if len(classes) < 2:
        raise UserError(f"{source}: needs at least 2 classes to derive a class-disjoint test split")
    boundary = classes[(len(classes) + 1) // 2]
    in_train = images.labels < boundary
    rows_train, rows_test = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    train = _image_set("train", [images.paths[i] for i in rows_train], images.labels[rows_train].tolist())
    test = _image_set("test", [images.paths[i] for i in rows_test], images.labels[rows_test].tolist())
    note = (f"{source}: no test split given; derived a class-disjoint one: the last {test.num_classes} of "
            f"{len(classes)} classes (in sorted order) are the test set, the first {train.num_classes} train")
    return train, test, note


SPLIT_NAMES = ("train", "val", "test", "query", "gallery")


def _description(name: str, root: Path, sets: dict[str, ImageSet], source: str) -> DatasetDescription:
    """Evaluation pairs for the splits a generic layout gave (deriving test when there is none)."""
    if "train" not in sets:
        raise UserError(f"{source}: no 'train' split")
    if ("query" in sets) != ("gallery" in sets):
        raise UserError(f"{source}: a 'query' split needs a 'gallery' split and vice versa")
    notes: tuple[str, ...] = ()
    if "test" not in sets and "query" not in sets:
        sets["train"], sets["test"], note = derive_test_split(sets["train"], source)
        notes = (note,)
    pairs: dict[str, tuple[str, str | None]] = {}
    if "test" in sets:
        pairs["test"] = ("test", None)
    if "query" in sets:
        pairs["test" if "test" not in sets else "query"] = ("query", "gallery")
    if "val" in sets:
        pairs["val"] = ("val", None)
    return DatasetDescription(name, root, sets, pairs, notes)


def _read_rows(index: Path) -> tuple[list[tuple[int, list[str]]], str]:
    """Non-blank CSV/TSV rows (1-based line number, stripped fields) without the header, and the delimiter."""
    rows: list[tuple[int, list[str]]] = []
    with open(_require_file(index), encoding="utf-8", newline="") as handle:
        sample = handle.readline()
        handle.seek(0)
        delimiter = "\t" if "\t" in sample else ","
        for number, fields in enumerate(csv.reader(handle, delimiter=delimiter), start=1):
            fields = [f.strip() for f in fields]
            if any(fields):
                rows.append((number, fields))
    if rows and rows[0][1][0].lower() == "path":
        rows = rows[1:]
    if not rows:
        raise UserError(f"{index}: no entries")
    return rows, delimiter


def read_list(root: Path | None, list_file: str) -> DatasetDescription:
    """CSV/TSV list `path,label[,split]` with an optional header line.

    Paths are relative to `root`, or absolute inside it; without a root (`data.root: ""`) absolute paths
    are taken as they are and relative ones are relative to the list file's folder. `list_file` itself
    is relative to `root` when one is given. Labels are integers or names. Split values are
    train|val|test|query|gallery; a list without split column (or without test rows) gets a derived
    class-disjoint test split (`derive_test_split`). A query split requires a gallery split and vice versa.
    """
    if not list_file:
        raise UserError("data.list_file: required when data.dataset=list")
    index = Path(list_file) if os.path.isabs(list_file) or root is None else root / list_file
    index = Path(os.path.abspath(index))
    rows, delimiter = _read_rows(index)
    base = index.parent if root is None else None
    with_split = len(rows[0][1]) == 3
    paths, raw_labels, splits = [], [], []
    for number, fields in rows:
        if len(fields) != (3 if with_split else 2) or not fields[0] or not fields[1]:
            raise UserError(f"{index}:{number}: malformed line: expected 'path{delimiter}label"
                            f"{delimiter + 'split' if with_split else ''}' like the first line")
        relpath = fields[0] if base is None else os.path.join(base, fields[0])
        paths.append(resolve_inside(root, relpath, f"{index}:{number}",
                                    "; with data.root='' a list may name images anywhere"))
        raw_labels.append(fields[1])
        if with_split:
            if fields[2] not in SPLIT_NAMES:
                raise UserError(f"{index}:{number}: malformed line: split '{fields[2]}' is not one of "
                                f"{', '.join(SPLIT_NAMES)}")
            splits.append(fields[2])
    labels = _labels_to_ints(raw_labels)
    names = [s for s in SPLIT_NAMES if s in splits] if with_split else ["train"]
    tags = splits if with_split else ["train"] * len(paths)
    sets = {s: _image_set(s, [p for p, t in zip(paths, tags) if t == s],
                          [lab for lab, t in zip(labels, tags) if t == s]) for s in names}
    return _description("list", root if root is not None else index.parent, sets, str(index))


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_images(root: Path, folder: Path, label_of: dict[str, int]) -> tuple[list[str], list[int]]:
    """Every image below `folder/<class>/` (recursively, sorted, symlinks followed), each checked to stay
    inside `root`; a linked folder leading outside is refused (or, in `data check`, recorded) without
    being walked, and a link loop is cut."""
    base = os.path.realpath(root)
    seen: set[str] = set()

    def enter(path: str, where: str) -> bool:
        """Whether to walk into `path` (inside the root, not walked yet)."""
        real = os.path.realpath(resolve_inside(root, os.path.relpath(path, root), where))
        if os.path.commonpath([base, real]) != base or real in seen:
            return False
        seen.add(real)
        return True

    paths, labels = [], []
    for name in _class_folders(folder):
        if not enter(str(folder / name), str(folder)):
            continue
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames[:] = [d for d in sorted(dirnames) if enter(os.path.join(dirpath, d), dirpath)]
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    full = os.path.join(dirpath, filename)
                    paths.append(resolve_inside(root, os.path.relpath(full, root), dirpath))
                    labels.append(label_of[name])
    return paths, labels


def read_folder(root: Path) -> DatasetDescription:
    """Class folders: `root/<class>/...` or, split by folder, `root/{train,val,test}/<class>/...`.

    A class's label is the index of its folder name among all class names (sorted), so a class seen in
    two splits keeps one label. Without a `test` folder the test split is derived (`derive_test_split`).
    Symlinked files and folders are followed but must stay inside the root.
    """
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    top = _class_folders(root)
    by_split = "train" in top and set(top) <= {"train", "val", "test"}
    folders = {s: root / s for s in top} if by_split else {"train": root}
    names = sorted({name for folder in folders.values() for name in _class_folders(folder)})
    label_of = {name: i for i, name in enumerate(names)}
    sets = {}
    for split, folder in folders.items():
        paths, labels = _folder_images(root, folder, label_of)
        if not paths:
            raise UserError(f"{folder}: no class folders with images ({', '.join(IMAGE_EXTENSIONS)})")
        sets[split] = _image_set(split, paths, labels)
    return _description("folder", root, {s: sets[s] for s in SPLIT_NAMES if s in sets}, str(root))


@dataclass(frozen=True)
class DatasetReader:
    """How one `data.dataset` value is read: `read(root, list_file)`, a line for `unidml list datasets`,
    and for a built-in dataset the module generating it into `data.root` on first use."""

    read: Callable[[Path | None, str], DatasetDescription]
    description: str
    needs_root: bool = True
    generator: str | None = None
    id_files: tuple[str, ...] = ()  # index files whose first column is an image id that must be unique


def _sop_layout(name: str) -> Callable[[Path | None, str], DatasetDescription]:
    return lambda root, _list_file: read_sop(root, name=name)


SOP_INDEX = ("Ebay_train.txt", "Ebay_test.txt")


def _root_only(reader: Callable[[Path], DatasetDescription]) -> Callable[[Path | None, str], DatasetDescription]:
    return lambda root, _list_file: reader(root)


for _name, _reader in (
    ("sop", DatasetReader(_sop_layout("sop"), "Stanford Online Products: Ebay_train.txt, Ebay_test.txt under "
                                              "data.root", id_files=SOP_INDEX)),
    ("inshop", DatasetReader(_root_only(read_inshop), "In-Shop Clothes Retrieval: list_eval_partition.txt (query "
                                                      "against gallery)")),
    ("cub", DatasetReader(_root_only(read_cub), "CUB-200-2011: images.txt, images/ (classes 1-100 train, 101-200 "
                                                "test)", id_files=("images.txt",))),
    ("cars", DatasetReader(_root_only(read_cars), "Cars196: cars_annos.mat, car_ims/ (classes 1-98 train, 99-196 "
                                                  "test)")),
    ("list", DatasetReader(read_list, "your images in a CSV/TSV list, `path,label[,split]` per row "
                                      "(configs/list.yaml)", needs_root=False)),
    ("folder", DatasetReader(_root_only(read_folder), "your images in class folders, root/<class>/ or "
                                                      "root/{train,val,test}/<class>/ (configs/folder.yaml)")),
    ("synthetic", DatasetReader(_sop_layout("synthetic"), "the built-in synthetic dataset (SOP layout), "
                                "generated into data.root on first use", generator="unidml.data_pipeline.synthetic",
                                id_files=SOP_INDEX)),
    ("glyphs", DatasetReader(_sop_layout("glyphs"), "the built-in stroke-figure dataset (SOP layout, class in "
                             "the geometry, colour a nuisance), generated into data.root on first use",
                             generator="unidml.data_pipeline.glyphs", id_files=SOP_INDEX)),
):
    DATASETS.add(_name, _reader)


def read_dataset(kind: str, root: Path | str | None, list_file: str = "") -> DatasetDescription:
    """Read the registered dataset `kind` under `root`. Only a list may go without a root (`None` or empty)."""
    if kind not in DATASETS:
        raise UserError(f"data.dataset: unknown dataset '{kind}' (known: {', '.join(DATASETS.names())})")
    reader = DATASETS[kind]
    root = Path(os.path.abspath(root)) if root not in (None, "") else None
    if root is None and reader.needs_root:
        raise UserError(f"data.root: required for data.dataset={kind} (only a list file may go without one)")
    return reader.read(root, list_file)
