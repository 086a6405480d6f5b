"""Reading image files robustly, and the record of the ones that could not be read.

Grayscale, CMYK, palette/alpha images and PNGs with a .jpg name are readable: they are converted to
RGB. Missing, zero-byte, truncated, corrupt or non-image files are *bad*, and so is an image whose
header claims more than `data.max_pixels` pixels (checked from the header, before any decoder
allocates for it, in both backends). `data.on_error=skip` replaces a bad training sample and
leaves a bad evaluation image out (counted, logged once, listed in `bad_images.txt`); `fail` stops
with one line naming the file.

The default (and largest) `data.max_pixels` is PIL's own decompression-bomb limit (2 x
`PIL.Image.MAX_IMAGE_PIXELS` = 178,956,970 pixels, e.g. 16384 x 10922): far above any photo in the
common datasets, while its decoded RGB (512 MiB) still fits a loader's memory. PIL refuses to open
anything larger, so one limit means the same in both backends.
"""
from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

from PIL import Image, ImageOps

from unidml.config import MAX_PIXELS_LIMIT
from unidml.errors import UserError

log = logging.getLogger(__name__)

# Leading bytes of the encodings both backends decode.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
              b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")  # ..., JPEG 2000 (jp2, j2k)
JPEG_END = b"\xff\xd9"
DEFAULT_MAX_PIXELS = MAX_PIXELS_LIMIT


class BadImage(Exception):
    """An image file that cannot be decoded; `detail` says why in a few words."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


def _too_large(path: str, pixels: int | str, max_pixels: int) -> BadImage:
    return BadImage(path, f"image too large ({pixels} pixels; data.max_pixels={max_pixels}), not decoded")


def _bomb(path: str, exc: Image.DecompressionBombError, max_pixels: int) -> BadImage:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return _too_large(path, found.group(1) if found else "over PIL's limit of " + str(DEFAULT_MAX_PIXELS), max_pixels)


def check_size(path: str, image: Image.Image, max_pixels: int) -> None:
    """BadImage when a lazily opened image (header parsed, nothing decoded) exceeds `max_pixels`."""
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(path, f"{width}x{height} = {width * height}", max_pixels)


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode `path` into an RGB PIL image; BadImage if it is missing, unreadable or larger
    than `max_pixels` (checked on the header before decoding)."""
    try:
        with Image.open(path) as image:
            check_size(path, image, max_pixels)
            image.load()
            image = ImageOps.exif_transpose(image)  # as DALI's decoders do
            return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except FileNotFoundError:
        raise BadImage(path, "missing file") from None
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb(path, exc, max_pixels) from None
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


def check_header_size(path: str, data: bytes, max_pixels: int) -> None:
    """BadImage when the encoded image's header claims more than `max_pixels` pixels, or cannot be
    parsed; only the header is read (PIL opens lazily), so a decompression bomb costs nothing."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_size(path, image, max_pixels)
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb(path, exc, max_pixels) from None
    except Exception as exc:  # PIL raises assorted errors for a header it cannot parse
        raise BadImage(path, f"unreadable image header ({type(exc).__name__}: {exc})") from None


def read_encoded(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bytes:
    """The file's bytes after `check_encoded` and, unless `max_pixels` is None (already checked),
    `check_header_size`; BadImage if missing, implausible or too large."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise BadImage(path, "missing file") from None
    except OSError as exc:
        raise BadImage(path, f"unreadable file ({exc.strerror})") from None
    check_encoded(path, data)
    if max_pixels is not None:
        check_header_size(path, data, max_pixels)
    return data


class BadImageLog:
    """Applies `data.on_error` to bad images reported by a loader.

    `skip`: each distinct path is logged once and appended to `run_dir/<filename>`; `count` is the
    number of distinct bad files, `encounters` the number of failed reads (replacement attempts
    included). `fail`: the first report raises a one-line UserError naming the file.
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

    def report(self, path: str, detail: str, action: str = "replaced") -> None:
        """One bad image; `action` says what the skip policy does with it (for the log line)."""
        if self.policy == "fail":
            raise UserError(f"{path}: {detail} (data.on_error=fail; skip replaces a bad training image and "
                            f"leaves a bad evaluation image out)")
        self.encounters += 1
        if path in self.seen:
            return
        self.seen[path] = detail
        log.warning("bad image %s: %s (%s)", path, detail, action)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(f"{path}\t{detail}\n")
