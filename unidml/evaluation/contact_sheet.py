"""A contact sheet PNG: the query image followed by its nearest gallery images with their scores.

When the query's class is known, each hit is framed green (same class: a correct hit) or red (another
class: a wrong hit), and its caption says which."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

CAPTION_HEIGHT = 30
MARGIN = 6
QUERY, CORRECT, WRONG = (30, 90, 200), (20, 150, 40), (210, 30, 30)  # frame colours


@dataclass(frozen=True)
class Hit:
    """One retrieved gallery image: its path, the caption line under it (e.g. 'cos 0.873') and whether it
    has the query's class (None: unknown, no mark)."""

    path: str
    caption: str
    correct: bool | None = None


def _tile(path: str, size: int) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.pad(image.convert("RGB"), (size, size), color=(235, 235, 235))


def _name(path: str) -> str:
    """The file name with its folder (often the class)."""
    return f"{Path(path).parent.name}/{Path(path).name}"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def write_contact_sheet(query_path: str, hits: Sequence[Hit], out_path: str | Path, *, thumb: int = 160,
                        columns: int = 5) -> Path:
    """Draw the query (first cell, framed) and the hits in rank order on a grid; save as PNG."""
    marks = {True: (CORRECT, " ok"), False: (WRONG, " WRONG"), None: (None, "")}
    cells = [(query_path, "query", _name(query_path), QUERY)]
    cells += [(hit.path, f"#{rank} {hit.caption}{marks[hit.correct][1]}", _name(hit.path), marks[hit.correct][0])
              for rank, hit in enumerate(hits, 1)]
    columns = max(1, min(columns, len(cells)))
    rows = -(-len(cells) // columns)
    cell_w, cell_h = thumb + 2 * MARGIN, thumb + CAPTION_HEIGHT + 2 * MARGIN
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    chars = max(8, thumb // 6)
    for i, (path, title, name, frame) in enumerate(cells):
        x, y = (i % columns) * cell_w + MARGIN, (i // columns) * cell_h + MARGIN
        sheet.paste(_tile(path, thumb), (x, y))
        if frame is not None:
            draw.rectangle((x - 3, y - 3, x + thumb + 2, y + thumb + 2), outline=frame, width=3)
        draw.text((x, y + thumb + 2), _short(title, chars), fill="black", font=font)
        draw.text((x, y + thumb + 15), _short(name, chars), fill=(90, 90, 90), font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, format="PNG")
    return out_path
