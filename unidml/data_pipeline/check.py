"""Validate a dataset tree: read its index, open every image, summarise splits and problems.

A dataset is *usable* when its index files read, every split has readable images and the training
split has at least two classes; missing or corrupt images alone leave it usable (`data.on_error=skip`
replaces them) but are listed. Paths escaping the root make it unusable and are never opened.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unidml.data_pipeline.readers import collecting_escapes, read_dataset
from unidml.errors import UserError

PROGRESS_FROM = 1000  # show a progress bar from this many images on


@dataclass
class Problem:
    path: str
    kind: str  # index | escapes_root | missing | zero_byte | unreadable | empty_split
    detail: str


@dataclass
class CheckReport:
    dataset: str
    root: str
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    converted: int = 0  # readable images stored as grayscale/CMYK/palette or misnamed (converted to RGB)

    @property
    def usable(self) -> bool:
        fatal = {"index", "escapes_root", "empty_split"}
        return not any(p.kind in fatal for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "root": self.root, "usable": self.usable, "splits": self.splits,
                "problems": [vars(p) for p in self.problems], "converted_to_rgb": self.converted}


def inspect_image(path: str) -> tuple[str, str] | None | bool:
    """None if `path` decodes as RGB JPEG, True if it decodes after conversion (mode or format),
    else (kind, detail) of the problem."""
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
            image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads all the data
            image.load()
            odd = image.mode != "RGB" or (image.format == "PNG" and path.lower().endswith((".jpg", ".jpeg")))
            return True if odd else None
    except Exception as exc:  # PIL raises assorted errors for broken data
        return "unreadable", f"{type(exc).__name__}: {exc}"


def _per_class(labels: np.ndarray) -> dict[str, float]:
    counts = np.unique(labels, return_counts=True)[1] if len(labels) else np.zeros(1, dtype=np.int64)
    return {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}


def check_dataset(kind: str, root: Path, list_file: str = "", workers: int | None = None,
                  progress: bool = True) -> CheckReport:
    """Inspect every image of every split with `workers` threads (PIL releases the GIL)."""
    report = CheckReport(kind, str(root))
    try:
        with collecting_escapes() as escapes:
            dataset = read_dataset(kind, root, list_file)
    except UserError as exc:
        where, _, detail = str(exc).partition(": ")  # "file[:line]: what is wrong"
        report.problems.append(Problem(where, "index", detail or str(exc)))
        return report
    escaped = {path for path, _ in escapes}
    report.problems += [Problem(path, "escapes_root", f"{where}: outside {root}") for path, where in escapes]
    todo = sorted({p for images in dataset.splits.values() for p in images.paths} - escaped)
    results: dict[str, tuple[str, str] | None | bool] = {}
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        outcomes = pool.map(inspect_image, todo, chunksize=64)
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
    lines.append(f"problems: {len(report.problems)} ({summary})")
    lines += [f"  {p.kind}: {p.path}: {p.detail}" for p in report.problems[:max_listed]]
    if len(report.problems) > max_listed:
        lines.append(f"  ... {len(report.problems) - max_listed} more (use --json for all)")
    if report.converted:
        lines.append(f"readable after conversion to RGB (grayscale/CMYK/palette/misnamed): {report.converted}")
    lines.append("status: usable" if report.usable else "status: NOT usable")
    return "\n".join(lines)
