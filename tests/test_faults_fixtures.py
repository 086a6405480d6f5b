"""Hostile inputs shared by the fault tests: a decompression-bomb JPEG and a header-only check."""
from __future__ import annotations

import io
import struct
from pathlib import Path

from PIL import Image


def write_bomb(path: Path, side: int = 30000) -> Path:
    """A valid tiny JPEG whose frame header (SOF0) claims `side` x `side` pixels: a few hundred bytes
    that a decoder trusting the header would allocate side² x 3 bytes for."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    struct.pack_into(">HH", data, sof + 5, side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def test_bomb_header_claims_the_size_without_the_data(tmp_path):
    path = write_bomb(tmp_path / "bomb.jpg", side=1000)
    with Image.open(path) as image:
        assert image.size == (1000, 1000)
    assert path.stat().st_size < 2048
