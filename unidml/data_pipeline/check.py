"""Validate a dataset tree: read its index, open every image, summarise splits and problems.

A dataset is *usable* when its index files read, every split has readable images and the training
split has at least two classes; missing, corrupt or oversized (`data.max_pixels`) images alone leave
it usable (`data.on_error=skip` replaces them in training and leaves them out of evaluation) but are
listed, and the status says so ("usable with problems", naming the counts). So is a class folder
without images (the folder layout skips it: the class does not exist for training). Paths escaping
the root (by their real path: symlinks are followed) make it unusable and are never opened. Also
listed: an image file indexed more than once (duplicated lines or ids, or two names for one file),
which inflates retrieval metrics, and classes whose queries have no relevant reference (one image in
a self-retrieval split, none in the gallery), which evaluation excludes.
"""
from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unidml.data_pipeline.dataset import DatasetDescription
from unidml.data_pipeline.images import DEFAULT_MAX_PIXELS, BadImage, check_size
from unidml.data_pipeline.readers import collecting_escapes, read_dataset
from unidml.errors import UserError
from unidml.registry import DATASETS

PROGRESS_FROM = 1000  # show a progress bar from this many images on
LISTED_CLASSES = 5  # class ids named per split in a "no relevant reference" problem
FATAL = frozenset({"index", "escapes_root", "empty_split"})
# What --strict also fails on: images training would replace and evaluation leave out, and duplicates.
STRICT = frozenset({"missing", "zero_byte", "unreadable", "too_large", "duplicate", "duplicate_id", "empty_class"})
# How the status line counts the problems that leave a dataset usable but change what trains or is evaluated.
STATUS_WORDS = {"missing": "missing", "zero_byte": "empty", "unreadable": "unreadable", "too_large": "too large",
                "duplicate": "indexed twice", "duplicate_id": "duplicate ids",
                "empty_class": "class folders without images"}


@dataclass
class Problem:
    path: str
    kind: str  # FATAL, STRICT, or single_image_class | no_gallery_match (noted, never fatal)
    detail: str


@dataclass
class CheckReport:
    dataset: str
    root: str
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    converted: int = 0  # readable images stored as grayscale/CMYK/palette or misnamed (converted to RGB)
    notes: list[str] = field(default_factory=list)  # what the reader derived (e.g. a test split)

    @property
    def usable(self) -> bool:
        return not any(p.kind in FATAL for p in self.problems)

    @property
    def strict_usable(self) -> bool:
        """Usable, and no bad image or duplicate either (`data check --strict`)."""
        return self.usable and not any(p.kind in STRICT for p in self.problems)

    @property
    def status(self) -> str:
        """One line: NOT usable, usable, or usable with the counts of what `--strict` fails on."""
        if not self.usable:
            return "NOT usable"
        counts: dict[str, int] = {}
        for p in self.problems:
            if p.kind in STRICT:
                counts[p.kind] = counts.get(p.kind, 0) + 1
        if not counts:
            return "usable"
        listed = ", ".join(f"{n} {STATUS_WORDS[k]}" for k, n in sorted(counts.items()))
        return (f"usable with problems: {listed} (unreadable images are replaced in training and left out of "
                f"evaluation; --strict fails on these)")

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "root": self.root, "usable": self.usable, "status": self.status,
                "splits": self.splits,
                "problems": [vars(p) for p in self.problems], "converted_to_rgb": self.converted,
                "notes": self.notes}


def inspect_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str] | None | bool:
    """None if `path` decodes as RGB JPEG, True if it decodes after conversion (mode or format),
    else (kind, detail) of the problem. The size limit is checked on the header, before decoding."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "missing", "file not found"
    except OSError as exc:
        return "unreadable", exc.strerror or str(exc)
    if size == 0:
        return "zero_byte", "empty file"
    try:
        with Image.open(path) as image:
            check_size(path, image, max_pixels)
            image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads all the data
            image.load()
            odd = image.mode != "RGB" or (image.format == "PNG" and path.lower().endswith((".jpg", ".jpeg")))
            return True if odd else None
    except BadImage as exc:
        return "too_large", exc.detail
    except Image.DecompressionBombError as exc:
        return "too_large", str(exc)
    except Exception as exc:  # PIL raises assorted errors for broken data
        return "unreadable", f"{type(exc).__name__}: {exc}"


def _per_class(labels: np.ndarray) -> dict[str, float]:
    counts = np.unique(labels, return_counts=True)[1] if len(labels) else np.zeros(1, dtype=np.int64)
    return {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}


def duplicate_files(dataset: DatasetDescription, escaped: set[str]) -> list[Problem]:
    """One problem per image file indexed more than once (same real path: a repeated line, or two
    names or symlinks for one file), naming the splits that list it; escapes are reported apart."""
    listed: dict[str, list[str]] = defaultdict(list)
    for name, images in dataset.splits.items():
        for path in images.paths:
            if path not in escaped:
                listed[os.path.realpath(path)].append(name)
    return [Problem(path, "duplicate", f"indexed {len(splits)} times (splits: {', '.join(splits)}); a duplicate "
                                       f"in an evaluation split is a guaranteed match and inflates Recall@K")
            for path, splits in sorted(listed.items()) if len(splits) > 1]


def duplicate_ids(kind: str, root: Path | None) -> list[Problem]:
    """One problem per image id used on more than one line of the layout's index files."""
    seen: dict[str, str] = {}
    problems = []
    for name in DATASETS.get(kind).id_files if root is not None else ():
        index = root / name
        with open(index, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                fields = line.split()
                if not fields or (name.startswith("Ebay_") and number == 1):
                    continue
                where = f"{index}:{number}"
                if fields[0] in seen:
                    detail = f"image id {fields[0]} already on {seen[fields[0]]}"
                    problems.append(Problem(where, "duplicate_id", detail))
                else:
                    seen[fields[0]] = where
    return problems


def _class_list(classes: np.ndarray) -> str:
    named = ", ".join(str(int(c)) for c in classes[:LISTED_CLASSES])
    return named + (f" and {len(classes) - LISTED_CLASSES} more" if len(classes) > LISTED_CLASSES else "")


def unmatched_classes(dataset: DatasetDescription) -> list[Problem]:
    """Classes whose images cannot be positives: one image in the training split (no positive pair)
    or in a self-retrieval split, or query classes the gallery lacks (such queries are excluded)."""
    problems = []
    self_retrieval = {"train"} | {query for query, gallery in dataset.eval_pairs.values() if gallery is None}
    for name in [s for s in dataset.splits if s in self_retrieval]:
        classes, counts = np.unique(dataset.splits[name].labels, return_counts=True)
        single = classes[counts == 1]
        if len(single):
            effect = ("no positive pair for pairwise losses" if name == "train" else
                      "their queries have no relevant reference and are excluded from the metrics")
            problems.append(Problem(name, "single_image_class", f"split '{name}': {len(single)} classes with a single "
                                                                f"image (labels {_class_list(single)}): {effect}"))
    for query, gallery in dataset.eval_pairs.values():
        if gallery is not None:
            lacking = np.setdiff1d(dataset.splits[query].classes, dataset.splits[gallery].classes)
            if len(lacking):
                detail = (f"split '{query}': {len(lacking)} classes have no image in '{gallery}' "
                          f"(labels {_class_list(lacking)}): their queries are excluded from the metrics")
                problems.append(Problem(query, "no_gallery_match", detail))
    return problems


def empty_class_folders(root: Path) -> list[Problem]:
    """Class folders of the folder layout (`root/<class>/` or `root/<split>/<class>/`) holding no image:
    the reader skips them, so the class silently does not exist."""
    from unidml.data_pipeline.readers import IMAGE_EXTENSIONS

    def folders(parent: Path) -> list[Path]:
        return sorted(d for d in parent.iterdir() if d.is_dir() and not d.name.startswith("."))

    top = folders(root)
    split_layout = "train" in {d.name for d in top} and {d.name for d in top} <= {"train", "val", "test"}
    classes = [c for split in top for c in folders(split)] if split_layout else top
    return [Problem(str(c), "empty_class", f"class folder '{c.name}' holds no image "
                                           f"({', '.join(IMAGE_EXTENSIONS)}); the class is left out")
            for c in classes
            if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in c.rglob("*") if f.is_file())]


def check_dataset(kind: str, root: Path | None, list_file: str = "", workers: int | None = None,
                  progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckReport:
    """Inspect every image of every split with `workers` threads (PIL releases the GIL)."""
    report = CheckReport(kind, str(root or list_file))
    try:
        with collecting_escapes() as escapes:
            dataset = read_dataset(kind, root, list_file)
    except UserError as exc:
        where, _, detail = str(exc).partition(": ")  # "file[:line]: what is wrong"
        report.problems.append(Problem(where, "index", detail or str(exc)))
        return report
    report.root, report.notes = str(dataset.root), list(dataset.notes)
    escaped = {path for path, _ in escapes}
    report.problems += [Problem(path, "escapes_root", f"{where}: outside {root}") for path, where in escapes]
    todo = sorted({p for images in dataset.splits.values() for p in images.paths} - escaped)
    results: dict[str, tuple[str, str] | None | bool] = {}
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        outcomes = pool.map(partial(inspect_image, max_pixels=max_pixels), todo, chunksize=64)
        if progress and len(todo) >= PROGRESS_FROM:
            from tqdm import tqdm

            outcomes = tqdm(outcomes, total=len(todo), desc="checking images", unit="img")
        for path, outcome in zip(todo, outcomes):
            results[path] = outcome
    for path in todo:
        outcome = results[path]
        if isinstance(outcome, tuple):
            report.problems.append(Problem(path, *outcome))
        elif outcome is True:
            report.converted += 1
    for name, images in dataset.splits.items():
        readable = [i for i, p in enumerate(images.paths) if p not in escaped and not isinstance(results[p], tuple)]
        report.splits[name] = {"images": len(images), "classes": images.num_classes, "readable": len(readable),
                               "images_per_class": _per_class(images.labels)}
        if not readable:
            report.problems.append(Problem(name, "empty_split", f"split '{name}' has no readable image"))
    if "train" in dataset.splits and dataset.train.num_classes < 2:
        report.problems.append(Problem("train", "empty_split", "the training split needs at least 2 classes"))
    report.problems += duplicate_files(dataset, escaped) + duplicate_ids(kind, dataset.root)
    if kind == "folder" and dataset.root is not None:
        report.problems += empty_class_folders(Path(dataset.root))
    report.problems += unmatched_classes(dataset)
    return report


def format_report(report: CheckReport, max_listed: int = 20) -> str:
    """Human-readable summary: per-split table, problem counts, the first problems, verdict."""
    lines = [f"dataset {report.dataset} at {report.root}",
             f"{'split':<10}{'images':>9}{'classes':>9}{'readable':>10}   images/class min/median/max"]
    for name, s in report.splits.items():
        c = s["images_per_class"]
        lines.append(f"{name:<10}{s['images']:>9}{s['classes']:>9}{s['readable']:>10}   "
                     f"{c['min']}/{c['median']:g}/{c['max']}")
    kinds: dict[str, int] = {}
    for p in report.problems:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) or "none"
    lines += [f"note: {note}" for note in report.notes]
    lines.append(f"problems: {len(report.problems)} ({summary})")
    lines += [f"  {p.kind}: {p.path}: {p.detail}" for p in report.problems[:max_listed]]
    if len(report.problems) > max_listed:
        lines.append(f"  ... {len(report.problems) - max_listed} more (use --json for all)")
    if report.converted:
        lines.append(f"readable after conversion to RGB (grayscale/CMYK/palette/misnamed): {report.converted}")
    lines.append(f"status: {report.status}")
    return "\n".join(lines)
