"""Reading image files robustly, and the record of the ones that could not be read.

Grayscale, CMYK, palette/alpha images and PNGs with a .jpg name are readable: they are converted to
RGB. Missing, zero-byte, truncated, corrupt or non-image files are *bad*: `data.on_error=skip`
replaces the sample (counted, logged once, listed in `bad_images.txt`), `fail` stops with one line
naming the file.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

from PIL import Image, ImageOps

from unidml.errors import UserError

log = logging.getLogger(__name__)

# Leading bytes of the encodings both backends decode.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
              b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")  # ..., JPEG 2000 (jp2, j2k)
JPEG_END = b"\xff\xd9"


class BadImage(Exception):
    """An image file that cannot be decoded; `detail` says why in a few words."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


def load_rgb(path: str) -> Image.Image:
    """Fully decode `path` into an RGB PIL image; BadImage if it is missing or unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)  # as DALI's decoders do
            return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except FileNotFoundError:
        raise BadImage(path, "missing file") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        kind = "zero-byte file" if _is_empty(path) else f"unreadable image ({type(exc).__name__}: {exc})"
        raise BadImage(path, kind) from None


def _is_empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def check_encoded(path: str, data: bytes) -> None:
    """Cheap sanity check of encoded bytes before a decoder that cannot recover from bad input
    (DALI): BadImage for empty data, an unknown signature, or a JPEG without its end marker."""
    if not data:
        raise BadImage(path, "zero-byte file")
    if not data.startswith(SIGNATURES) and not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        raise BadImage(path, "not an image (unknown file signature)")
    if data.startswith(b"\xff\xd8") and JPEG_END not in data[-64:]:
        raise BadImage(path, "truncated JPEG (no end-of-image marker)")


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of encoded image bytes; 1 when absent or unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            value = int(image.getexif().get(0x0112, 1))
    except Exception:  # no EXIF block, or one PIL cannot parse: no rotation
        return 1
    return value if 1 <= value <= 8 else 1


def read_encoded(path: str) -> bytes:
    """The file's bytes after `check_encoded`; BadImage if missing or implausible."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise BadImage(path, "missing file") from None
    except OSError as exc:
        raise BadImage(path, f"unreadable file ({exc.strerror})") from None
    check_encoded(path, data)
    return data


class BadImageLog:
    """Applies `data.on_error` to bad images reported by a loader.

    `skip`: each distinct path is logged once and appended to `run_dir/<filename>`; `count` is the
    number of distinct bad files, `encounters` the number of failed reads (replacement attempts included). `fail`: the first report raises a one-line UserError.
    """

    def __init__(self, policy: str, run_dir: Path | None, filename: str = "bad_images.txt") -> None:
        if policy not in ("skip", "fail"):
            raise UserError(f"data.on_error: '{policy}' is not one of skip, fail")
        self.policy = policy
        self.path = Path(run_dir) / filename if run_dir is not None else None
        self.seen: dict[str, str] = {}
        self.encounters = 0

    @property
    def count(self) -> int:
        return len(self.seen)

    def report(self, path: str, detail: str) -> None:
        if self.policy == "fail":
            raise UserError(f"{path}: {detail} (data.on_error=fail; use skip to replace bad images)")
        self.encounters += 1
        if path in self.seen:
            return
        self.seen[path] = detail
        log.warning("skipping bad image %s: %s", path, detail)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(f"{path}\t{detail}\n")
