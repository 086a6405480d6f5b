"""Readers for the original dataset layouts (DESIGN.md §2) and two generic ones.

Each reader turns a dataset tree into a `DatasetDescription` with absolute image paths and the
labels/splits DESIGN.md fixes. Index-file problems (missing file, malformed line, a path escaping the
root) raise `UserError` naming the file and line; image files themselves are not opened here (the
loaders apply `data.on_error`, and `unidml data check` inspects them).
"""
from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from unidml.data_pipeline.dataset import DatasetDescription, ImageSet
from unidml.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
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


def resolve_inside(root: Path, relpath: str, where: str) -> str:
    """Absolute path of `relpath` under `root`; UserError if it escapes the root (`..`, absolute)."""
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, relpath))
    if os.path.commonpath([base, full]) != base:
        found = _escapes.get()
        if found is None:
            raise UserError(f"{where}: path '{relpath}' escapes the dataset root {base}")
        found.append((full, where))
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


def _halves(paths: list[str], labels: list[int]) -> dict[str, ImageSet]:
    """Class-disjoint split for generic layouts: the first half of the sorted classes trains."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError("dataset needs at least 2 classes to form class-disjoint train/test splits")
    boundary = classes[(len(classes) + 1) // 2]
    return _split_by_class(paths, labels, lambda c: c < boundary)


def read_list(root: Path, list_file: str) -> DatasetDescription:
    """CSV/TSV list `path,label[,split]` (paths relative to `root`; optional header line).

    Split values are train|test|query|gallery; without a split column the classes are split in half
    (class-disjoint, like CUB/Cars). A query split requires a gallery split and vice versa.
    """
    if not list_file:
        raise UserError("data.list_file: required when data.dataset=list")
    index = Path(list_file) if os.path.isabs(list_file) else root / list_file
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
    with_split = len(rows[0][1]) == 3
    paths, raw_labels, splits = [], [], []
    for number, fields in rows:
        if len(fields) != (3 if with_split else 2) or not fields[0] or not fields[1]:
            raise UserError(f"{index}:{number}: malformed line: expected 'path{delimiter}label"
                            f"{delimiter + 'split' if with_split else ''}' like the first line")
        paths.append(resolve_inside(root, fields[0], f"{index}:{number}"))
        raw_labels.append(fields[1])
        if with_split:
            if fields[2] not in ("train", "test", "query", "gallery"):
                raise UserError(f"{index}:{number}: malformed line: split '{fields[2]}' is not one of "
                                f"train, test, query, gallery")
            splits.append(fields[2])
    labels = _labels_to_ints(raw_labels)
    if not with_split:
        return DatasetDescription("list", root, _halves(paths, labels), dict(SELF_RETRIEVAL))
    names = [s for s in ("train", "test", "query", "gallery") if s in splits]
    sets = {s: _image_set(s, [p for p, t in zip(paths, splits) if t == s],
                          [lab for lab, t in zip(labels, splits) if t == s]) for s in names}
    if "train" not in sets:
        raise UserError(f"{index}: no rows with split 'train'")
    if ("query" in sets) != ("gallery" in sets):
        raise UserError(f"{index}: a 'query' split needs a 'gallery' split and vice versa")
    pairs = {}
    if "test" in sets:
        pairs["test"] = ("test", None)
    if "query" in sets:
        pairs["query"] = ("query", "gallery")
    if not pairs:
        raise UserError(f"{index}: no evaluation rows (split 'test' or 'query'+'gallery')")
    return DatasetDescription("list", root, sets, pairs)


def read_folder(root: Path) -> DatasetDescription:
    """One sub-folder per class (sorted names give labels 0..K-1); classes split in half."""
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(os.path.abspath(dirpath), filename))
                    labels.append(label)
    if not paths:
        raise UserError(f"{root}: no class folders with images ({', '.join(IMAGE_EXTENSIONS)})")
    return DatasetDescription("folder", root, _halves(paths, labels), dict(SELF_RETRIEVAL))


def read_dataset(kind: str, root: Path, list_file: str = "") -> DatasetDescription:
    """Dispatch on `data.dataset` (synthetic data is in the SOP layout)."""
    if kind in ("sop", "synthetic"):
        return read_sop(root, name=kind)
    if kind == "list":
        return read_list(root, list_file)
    readers = {"inshop": read_inshop, "cub": read_cub, "cars": read_cars, "folder": read_folder}
    if kind not in readers:
        raise UserError(f"data.dataset: unknown dataset '{kind}'")
    return readers[kind](root)
