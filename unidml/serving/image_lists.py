"""Ad-hoc image catalogues for `unidml embed` and `unidml export --images`: a folder of images or a list file.

A folder gives every image below it (the extensions the dataset readers accept), labelled by its first-level
sub-folder; a list gives `path[,label]` lines. Paths are returned absolute, labels -1 where none is given.
"""
from __future__ import annotations

import csv
from pathlib import Path

from unidml.data_pipeline.readers import IMAGE_EXTENSIONS
from unidml.errors import UserError


def images_from_folder(folder: Path) -> tuple[list[str], list[int]]:
    """Every image below `folder` (sorted); label = index of its first-level sub-folder, -1 at the top."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    classes = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[p.relative_to(folder).parts[0]] if len(p.relative_to(folder).parts) > 1 else -1 for p in files]
    return [str(p.resolve()) for p in files], labels


def images_from_list(list_file: Path) -> tuple[list[str], list[int]]:
    """`path[,label]` (or tab-separated) lines; relative paths start at the list's folder; header `path` skipped."""
    paths, labels = [], []
    with open(list_file, encoding="utf-8", newline="") as handle:
        first = handle.readline()
        handle.seek(0)
        for number, fields in enumerate(csv.reader(handle, delimiter="\t" if "\t" in first else ","), start=1):
            fields = [f.strip() for f in fields]
            if not any(fields) or (number == 1 and fields[0].lower() == "path"):
                continue
            if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
                raise UserError(f"{list_file}:{number}: expected 'path' or 'path,label' with an integer label")
            paths.append(str((list_file.parent / fields[0]).resolve()))
            labels.append(int(fields[1]) if len(fields) == 2 else -1)
    return paths, labels
