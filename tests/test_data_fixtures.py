"""Tiny dataset trees in the original layouts (real JPEGs), written by the data-pipeline tests."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def image_array(label: int, index: int, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """A smooth, label-dependent RGB picture (compresses well, survives JPEG round trips)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng([label, index])
    base = rng.integers(40, 215, size=3)
    pic = np.stack([base[c] + 30 * np.sin((x + 3 * c + index) / 5.0) + 20 * np.cos(y / 4.0) for c in range(3)], -1)
    return np.clip(pic, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, label: int = 0, index: int = 0, size: tuple[int, int] = (40, 32), mode: str = "RGB",
               fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_array(label, index, size)).convert(mode).save(path, fmt, quality=95)
    return path


def jpeg_bytes(label: int = 0, index: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_array(label, index)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


BAD_KINDS = ("zero", "truncated", "garbage", "text")
READABLE_ODD_KINDS = ("gray", "cmyk", "png_as_jpg")


def write_odd(path: Path, kind: str) -> Path:
    """A bad file (`BAD_KINDS`) or a readable oddity (`READABLE_ODD_KINDS`) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(jpeg_bytes(7, 7)[:300])
    elif kind == "garbage":
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "gray":
        write_jpeg(path, 3, 3, mode="L")
    elif kind == "cmyk":
        write_jpeg(path, 4, 4, mode="CMYK")
    elif kind == "png_as_jpg":
        write_jpeg(path, 5, 5, fmt="PNG")
    else:
        raise ValueError(kind)
    return path


def make_sop(root: Path, train_classes: int = 4, test_classes: int = 3, per_class: int = 3,
             size: tuple[int, int] = (40, 32)) -> Path:
    """SOP layout: class ids 1..train_classes train, the next ones test; images `cls_final/`."""
    image_id = 1
    for split, first, count in (("train", 1, train_classes), ("test", train_classes + 1, test_classes)):
        lines = ["image_id class_id super_class_id path"]
        for cls in range(first, first + count):
            for k in range(per_class):
                rel = f"class{cls:03d}_final/{cls}_{k}.JPG"
                write_jpeg(root / rel, cls, k, size)
                lines.append(f"{image_id} {cls} {1 + cls % 2} {rel}")
                image_id += 1
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_inshop(root: Path) -> Path:
    """In-Shop: 3 train items (2 images each), 2 eval items (1 query + 2 gallery each)."""
    rows = []
    for n in range(3):
        for k in range(2):
            rows.append((f"img/MEN/Tees/id_{n + 10:08d}/{k:02d}_1_front.jpg", f"id_{n + 10:08d}", "train"))
    for n in range(2):
        item = f"id_{n:08d}"  # sorts before the train items: mapping is over the whole file
        rows.append((f"img/WOMEN/Dresses/{item}/01_1_front.jpg", item, "query"))
        rows += [(f"img/WOMEN/Dresses/{item}/0{k}_2_side.jpg", item, "gallery") for k in (2, 3)]
    for i, (rel, item, _) in enumerate(rows):
        write_jpeg(root / rel, int(item[3:]), i)
    text = [str(len(rows)), "image_name item_id evaluation_status"] + [f"{r}   {i}   {s}" for r, i, s in rows]
    (root / "list_eval_partition.txt").write_text("\n".join(text) + "\n")
    return root


def make_cub(root: Path, classes: tuple[int, ...] = (1, 2, 100, 101, 200), per_class: int = 2) -> Path:
    """CUB: `images.txt` + `images/NNN.Name/`; classes ≤ 100 (labels 0..99) train."""
    lines, image_id = [], 1
    for cls in classes:
        for k in range(per_class):
            rel = f"{cls:03d}.Bird_{cls}/Bird_{cls}_{k:04d}.jpg"
            write_jpeg(root / "images" / rel, cls, k)
            lines.append(f"{image_id} {rel}")
            image_id += 1
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    return root


def make_cars(root: Path, classes: tuple[int, ...] = (1, 98, 99, 196), per_class: int = 2) -> Path:
    """Cars196: `cars_annos.mat` struct array + `car_ims/`; classes ≤ 98 (labels 0..97) train;
    the test flags written here contradict that on purpose (they must be ignored)."""
    from scipy.io import savemat

    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
             ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    records, n = [], 1
    for cls in classes:
        for k in range(per_class):
            rel = f"car_ims/{n:06d}.jpg"
            write_jpeg(root / rel, cls, k)
            records.append((rel, 1, 1, 30, 20, cls, k % 2))
            n += 1
    annotations = np.array(records, dtype=dtype).reshape(1, -1)
    savemat(str(root / "cars_annos.mat"), {"annotations": annotations,
                                          "class_names": np.array([f"car {c}" for c in range(196)], dtype=object)})
    return root
