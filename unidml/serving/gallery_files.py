"""The indexed gallery images as `GET /gallery/<relative path>` serves them: only the index's own images,
and only while the file they name is still inside the gallery root (no `..`, absolute paths or symlinks
out of it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from unidml.errors import UserError
from unidml.serving.errors import RequestError


class GalleryFiles:
    """Paths of the indexed images relative to the gallery root: the deepest folder holding them all."""

    def __init__(self, paths: Sequence[str]) -> None:
        if not paths:
            raise UserError("the index holds no images")
        absolute = [os.path.abspath(p) for p in paths]
        self.root = Path(os.path.commonpath([os.path.dirname(p) for p in absolute]))
        self.relative = [Path(p).relative_to(self.root).as_posix() for p in absolute]
        self._listed = set(self.relative)

    def file(self, requested: str) -> Path:
        """The file behind a decoded `/gallery/` path. 404 unless `requested` is exactly an indexed image's
        relative path (those hold no `.`, `..` or leading `/`, so no such name gets through); 403 when its
        real path (symlinks followed) is no longer inside the root."""
        if requested not in self._listed:
            raise RequestError(404, "no such gallery image")
        real = Path(os.path.realpath(self.root / requested))
        if not real.is_relative_to(os.path.realpath(self.root)):
            raise RequestError(403, "the gallery image points outside the gallery root")
        if not real.is_file():
            raise RequestError(404, "the gallery image file is missing")
        return real
