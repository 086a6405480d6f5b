"""The built-in synthetic dataset: a deterministic, fine-grained, many-class image set in the
Stanford Online Products layout (`Ebay_train.txt` / `Ebay_test.txt`, class-disjoint splits).

A class is a combination of five attributes: shape family, part layout (small discs placed in the
object's own frame), body hue, part hue and body texture (pattern and frequency, in the object's
frame). Classes are drawn from a few uniform roots by a random walk in which each new class changes
one or two attributes of an earlier one, so most classes have near neighbours differing only in a
detail. The super class (SOP's super_class_id) is the shape family. Every instance
gets its own nuisances -- background gradient and clutter drawn from the same palette, rotation,
scale, translation (partial crops), lighting, colour cast, blur, noise and JPEG quality -- so that
low-level image statistics do not identify the class while the attributes stay visible at 64 px.

Same arguments give byte-identical files: every image has its own RNG seeded from
(seed, class, instance), independent of how classes are spread over worker processes.
`generate_dataset` also writes the other built-in generated set (`unidml.data_pipeline.glyphs`):
a generator is a module with `class_specs(classes, seed)` and `render_image(spec, rng, size)`.
"""
from __future__ import annotations

import colorsys
import importlib
import io
import json
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from unidml.errors import UserError

MARKER = "synthetic.json"
GENERATOR_VERSION = 1
SUPERSAMPLE = 2  # objects are drawn at 2x and box-downsampled: anti-aliased edges at small sizes

# Attribute vocabularies. Everything is mirror-symmetric about the object's vertical axis, so a
# horizontal-flip augmentation never turns one class into another; rotation stays within +-30 deg,
# below half of every shape's rotational symmetry angle, so the object frame stays recoverable.
SHAPES = ("triangle", "square", "pentagon", "star", "ellipse", "cross", "dome")
LAYOUTS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((0.0, -0.5),),
    ((0.0, 0.45),),
    ((-0.45, 0.0), (0.45, 0.0)),
    ((0.0, -0.45), (0.0, 0.45)),
    ((-0.5, 0.05), (0.0, 0.05), (0.5, 0.05)),
    ((0.0, -0.45), (-0.4, 0.3), (0.4, 0.3)),
    ((-0.35, -0.35), (0.35, -0.35), (-0.35, 0.35), (0.35, 0.35)),
    ((0.0, 0.0),),
)
TEXTURES = ("plain", "hstripes", "vstripes", "checker", "dots")
TEXTURE_PERIODS = (0.62, 0.38)  # in units of the object radius: coarse, fine
HUES = tuple(i / 8 for i in range(8))
ROTATION_DEG = 30.0


@dataclass(frozen=True)
class ClassSpec:
    """The attributes that define one class."""

    shape: int
    layout: int
    body_hue: int
    part_hue: int
    texture: int  # 0 = plain; else 1 + 2 * (pattern - 1) + period index

    @property
    def super_class(self) -> int:
        """Coarse family used as SOP's super_class_id (1-based): the shape family."""
        return self.shape + 1


NUM_TEXTURES = 1 + 2 * (len(TEXTURES) - 1)
ATTRIBUTE_SIZES = (len(SHAPES), len(LAYOUTS), len(HUES), len(HUES), NUM_TEXTURES)


def _parts_contrast(attrs: tuple[int, ...]) -> bool:
    return attrs[2] != attrs[3]  # body hue != part hue


def class_specs(classes: int, seed: int) -> list[ClassSpec]:
    """`classes` distinct class specs, deterministic in `seed`: a few uniformly drawn roots, then a
    random walk where each new class copies an earlier one and changes one or two attributes
    (fine-grained neighbours), shuffled so that train and test classes share one distribution."""
    rng = np.random.default_rng([seed, 1])
    capacity = int(np.prod(ATTRIBUTE_SIZES)) * (len(HUES) - 1) // len(HUES) // 2  # walk stays fast below half
    if classes > capacity:
        raise UserError(f"--classes {classes}: the synthetic generator supports at most {capacity} classes")
    chosen: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    roots = max(1, classes // 6)  # independent uniform roots keep every attribute value in use
    while len(chosen) < classes:
        if len(chosen) < roots:
            candidate = tuple(int(rng.integers(n)) for n in ATTRIBUTE_SIZES)
        else:
            child = list(chosen[int(rng.integers(len(chosen)))])
            for attr in rng.choice(len(ATTRIBUTE_SIZES), size=int(rng.integers(1, 3)), replace=False):
                child[attr] = (child[attr] + int(rng.integers(1, ATTRIBUTE_SIZES[attr]))) % ATTRIBUTE_SIZES[attr]
            candidate = tuple(child)
        if _parts_contrast(candidate) and candidate not in seen:
            seen.add(candidate)
            chosen.append(candidate)
    order = rng.permutation(classes)  # early walk steps cluster: mix them over both splits
    return [ClassSpec(*chosen[i]) for i in order]


def _hue_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255.0


def _shape_outline(shape: str) -> np.ndarray:
    """Outline vertices (x, y) of a shape in its own frame: radius ~1, y pointing down."""
    def regular(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
        t = phase + 2 * np.pi * np.arange(n) / n
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)

    if shape == "triangle":
        return regular(3, 1.15) + np.array([0.0, 0.15])
    if shape == "square":
        return regular(4, 1.1, phase=-np.pi / 4)
    if shape == "pentagon":
        return regular(5, 1.05)
    if shape == "star":
        outer, inner = regular(5, 1.15), regular(5, 0.6, phase=-np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2)
    if shape == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([1.1 * np.cos(t), 0.72 * np.sin(t)], axis=1)
    if shape == "cross":
        a, b = 1.05, 0.38
        return np.array([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a),
                         (-b, b), (-a, b), (-a, -b), (-b, -b)])
    if shape == "dome":  # flat bottom, round top
        t = np.linspace(np.pi, 2 * np.pi, 32)
        arc = np.stack([1.05 * np.cos(t), 1.05 * np.sin(t) + 0.4], axis=1)
        return np.concatenate([arc, np.array([[1.05, 0.75], [-1.05, 0.75]])])
    raise ValueError(shape)


OUTLINES = tuple(_shape_outline(name) for name in SHAPES)


def _texture(texture: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pattern in [0, 1] at object-frame coordinates (u, v); 0 = plain body colour."""
    if texture == 0:
        return np.zeros_like(u)
    pattern = TEXTURES[1 + (texture - 1) // 2]
    period = TEXTURE_PERIODS[(texture - 1) % 2]
    fu, fv = u / period, v / period
    if pattern == "hstripes":
        return (np.floor(fv) % 2).astype(np.float32)
    if pattern == "vstripes":
        return (np.floor(fu) % 2).astype(np.float32)
    if pattern == "checker":
        return ((np.floor(fu) + np.floor(fv)) % 2).astype(np.float32)
    du, dv = fu - np.round(fu), fv - np.round(fv)  # dots on a square grid
    return (du * du + dv * dv < 0.09).astype(np.float32)


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """Random two-colour gradient plus clutter shapes in palette colours: no class cue."""
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / side
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle) + 0.5, 0, 1)[..., None]
    c0 = _hue_rgb(rng.uniform(), rng.uniform(0.0, 0.6), rng.uniform(0.3, 1.0))
    c1 = _hue_rgb(rng.uniform(), rng.uniform(0.0, 0.6), rng.uniform(0.3, 1.0))
    image = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        hue = HUES[int(rng.integers(len(HUES)))]
        colour = tuple(int(c) for c in _hue_rgb(hue, rng.uniform(0.3, 0.85), rng.uniform(0.4, 0.95)))
        cx, cy = rng.uniform(-0.1, 1.1, size=2) * side
        r = rng.uniform(0.05, 0.22) * side
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - r, cy - 0.5 * r, cx + r, cy + 0.5 * r], fill=colour)
        else:
            for k in range(-2, 3):  # a patch of stripes
                draw.line([cx - r, cy + k * r / 3, cx + r, cy + k * r / 3], fill=colour, width=max(1, side // 40))
    return image


def render_image(spec: ClassSpec, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB instance of class `spec` at `size` x `size`, nuisances drawn from `rng`."""
    side = size * SUPERSAMPLE
    image = _background(rng, side)

    angle = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    radius = rng.uniform(0.28, 0.38) * side
    aspect = rng.uniform(0.9, 1.1)
    centre = side / 2 + rng.uniform(-0.12, 0.12, size=2) * side
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    to_image = rot @ np.diag([radius * aspect, radius / aspect])  # object frame -> pixels

    def place(points: np.ndarray) -> list[tuple[float, float]]:
        return [tuple(p) for p in points @ to_image.T + centre]

    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon(place(OUTLINES[spec.shape]), fill=255)

    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    uv = np.stack([xs - centre[0], ys - centre[1]], axis=-1) @ np.linalg.inv(to_image).T
    u, v = uv[..., 0], uv[..., 1]
    body = _hue_rgb(HUES[spec.body_hue], rng.uniform(0.65, 0.9), rng.uniform(0.75, 0.95))
    light_angle = rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(light_angle), np.sin(light_angle)]) * rng.uniform(0, 0.25)
    shading = 1.0 + light[0] * u + light[1] * v
    tone = 1.0 - rng.uniform(0.4, 0.55) * _texture(spec.texture, u, v)
    body_pixels = np.clip(body[None, None, :] * (tone * shading)[..., None], 0, 255).astype(np.uint8)
    image.paste(Image.fromarray(body_pixels), (0, 0), mask)

    draw = ImageDraw.Draw(image)
    part = tuple(int(c) for c in _hue_rgb(HUES[spec.part_hue], rng.uniform(0.7, 0.95), rng.uniform(0.8, 1.0)))
    outline = (20, 20, 20)
    part_radius = 0.17 * radius
    for x, y in place(np.array(LAYOUTS[spec.layout])):
        draw.ellipse([x - part_radius, y - part_radius, x + part_radius, y + part_radius],
                     fill=part, outline=outline, width=max(1, SUPERSAMPLE))

    image = image.resize((size, size), Image.BOX)
    blur = rng.uniform(0.0, 0.8)
    if blur > 0.15:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    contrast, brightness = rng.uniform(0.7, 1.25), rng.uniform(-30, 30)
    cast = rng.uniform(0.88, 1.12, size=3)
    pixels = (pixels - 128.0) * contrast + 128.0 + brightness
    pixels = pixels * cast + rng.normal(0.0, rng.uniform(0.0, 7.0), size=pixels.shape)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the generated bytes; stored in the marker file."""

    classes: int
    per_class: int
    size: int
    seed: int
    test_fraction: float
    version: int = GENERATOR_VERSION

    def validate(self) -> None:
        if self.classes < 2:
            raise UserError(f"--classes {self.classes}: need at least 2 (one train and one test class)")
        if self.per_class < 2:
            raise UserError(f"--per-class {self.per_class}: need at least 2 images per class for retrieval")
        if self.size < 16:
            raise UserError(f"--size {self.size}: images must be at least 16 pixels")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"--test-fraction {self.test_fraction}: must be strictly between 0 and 1")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed}: must be non-negative")

    @property
    def test_classes(self) -> int:
        return min(self.classes - 1, max(1, round(self.classes * self.test_fraction)))

    @property
    def train_classes(self) -> int:
        return self.classes - self.test_classes


def _class_dir(class_id: int) -> str:
    return f"images/c{class_id:04d}"


def _write_class(job: tuple[Path, SynthParams, object, int, str]) -> None:
    """Render and save every image of one class (0-based `index`) under `root` with module `generator`."""
    root, params, spec, index, generator = job
    render = importlib.import_module(generator).render_image
    folder = root / _class_dir(index + 1)
    folder.mkdir(parents=True, exist_ok=True)
    for instance in range(params.per_class):
        rng = np.random.default_rng([params.seed, 2, index, instance])
        image = render(spec, rng, params.size)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
        image_id = index * params.per_class + instance + 1
        (folder / f"{image_id:06d}.jpg").write_bytes(buffer.getvalue())


def _list_file(params: SynthParams, specs: list, class_range: range) -> str:
    lines = ["image_id class_id super_class_id path"]
    for index in class_range:
        for instance in range(params.per_class):
            image_id = index * params.per_class + instance + 1
            path = f"{_class_dir(index + 1)}/{image_id:06d}.jpg"
            lines.append(f"{image_id} {index + 1} {specs[index].super_class} {path}")
    return "\n".join(lines) + "\n"


def read_marker(root: Path, generator: str = __name__) -> dict | None:
    """The parameters a previous generation by module `generator` stored in `root`, or None if `root` is not one."""
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == generator else None


def _marker_text(params: SynthParams, generator: str) -> str:
    return json.dumps({"generator": generator, **asdict(params)}, indent=2, sort_keys=True) + "\n"


def _check_target(out: Path, generator: str) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and read_marker(out, generator) is None:
        raise UserError(f"--out {out}: directory is not empty and is not a {generator.rsplit('.', 1)[-1]} dataset; "
                        f"choose another path")


def generate_dataset(out: Path, classes: int = 100, per_class: int = 40, size: int = 64, seed: int = 0,
                     test_fraction: float = 0.5, workers: int | None = None, generator: str = __name__) -> Path:
    """Write the dataset of module `generator` (this one's by default) under `out` (SOP layout plus a
    `synthetic.json` marker) and return `out`. Classes 1..T are train, T+1..N test. The tree is built
    in a sibling temp directory and renamed into place, so an interrupted run never leaves a
    complete-looking dataset; an existing dataset of the same generator and parameters is kept as is,
    one with other parameters replaced. `workers` processes render classes in parallel (default: the
    usable cores, at most 8); the bytes written do not depend on it."""
    out = Path(out)
    target = out.resolve()
    params = SynthParams(int(classes), int(per_class), int(size), int(seed), float(test_fraction))
    params.validate()
    _check_target(target, generator)
    marker = read_marker(target, generator) if target.is_dir() else None
    if marker is not None and marker == json.loads(_marker_text(params, generator)):
        return out

    specs = importlib.import_module(generator).class_specs(params.classes, params.seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        jobs = [(staging, params, spec, index, generator) for index, spec in enumerate(specs)]
        workers = min(8, len(os.sched_getaffinity(0))) if workers is None else workers
        if workers > 1:
            with multiprocessing.get_context().Pool(workers) as pool:
                pool.map(_write_class, jobs, chunksize=1)
        else:
            for job in jobs:
                _write_class(job)
        (staging / "Ebay_train.txt").write_text(_list_file(params, specs, range(params.train_classes)))
        (staging / "Ebay_test.txt").write_text(_list_file(params, specs, range(params.train_classes, params.classes)))
        (staging / MARKER).write_text(_marker_text(params, generator))
        if target.exists():
            shutil.rmtree(target)  # an empty directory or an older synthetic dataset (checked above)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
