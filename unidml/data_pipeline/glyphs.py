"""The second built-in generated dataset, `glyphs`: class-disjoint, fine-grained stroke figures
whose class lives in their geometry alone.

It differs in kind from `unidml.data_pipeline.synthetic`, where a class is a combination of
discrete attributes (shape, part layout, hues, texture) and colour identifies it. Here a class is a
glyph: a few smooth strokes (quadratic Bezier curves) in a continuous space of control points.
Glyphs descend from a few random roots (the super class) by moving one stroke of an earlier glyph,
so most classes have a near twin differing in one stroke. Colour carries no class information: every
instance draws its ink colour (light on a dark background or dark on a light one), stroke width,
pose (rotation, scale, translation), a per-instance wobble of every control point, a background
of faint random sinusoids and thin clutter strokes of the same kind, then blur, noise and JPEG
quality.

Written in the SOP layout with `synthetic.generate_dataset` (same parameters `data.synthetic`, the
same byte-for-byte determinism per (seed, class, instance)).
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from unidml.errors import UserError

STROKES = 3  # strokes per glyph
ROOT_SHARE = 5  # one root glyph per this many classes
MIN_MOVE = 0.35  # a child's changed stroke moves by at least this much (max control-point shift)
WOBBLE = 0.05  # per-instance control-point jitter, in glyph units (the glyph spans [-1, 1])
ROTATION_DEG = 25.0
MAX_CLASSES = 5000
SUPERSAMPLE = 2
CURVE_POINTS = 24


@dataclass(frozen=True)
class GlyphSpec:
    """One class: STROKES strokes of three control points (x, y) each, and its root glyph."""

    strokes: tuple[tuple[float, ...], ...]  # per stroke: x0, y0, x1, y1, x2, y2
    root: int

    @property
    def super_class(self) -> int:
        """SOP's super_class_id (1-based): the root glyph the class descends from."""
        return self.root + 1


def _stroke(rng: np.random.Generator) -> tuple[float, ...]:
    """A random stroke: two end points at least 0.6 apart and a control point, all inside [-0.8, 0.8]^2."""
    while True:
        points = rng.uniform(-0.8, 0.8, size=(3, 2))
        if np.linalg.norm(points[0] - points[2]) >= 0.6:
            return tuple(float(v) for v in np.round(points.ravel(), 4))


def class_specs(classes: int, seed: int) -> list[GlyphSpec]:
    """`classes` glyphs, deterministic in `seed`: random roots, then children that copy an earlier
    glyph and redraw or shift one stroke by at least MIN_MOVE, shuffled over both splits."""
    if classes > MAX_CLASSES:
        raise UserError(f"--classes {classes}: the glyphs generator supports at most {MAX_CLASSES} classes")
    rng = np.random.default_rng([seed, 11])
    roots = max(1, classes // ROOT_SHARE)
    chosen: list[GlyphSpec] = []
    while len(chosen) < classes:
        if len(chosen) < roots:
            chosen.append(GlyphSpec(tuple(_stroke(rng) for _ in range(STROKES)), len(chosen)))
            continue
        parent = chosen[int(rng.integers(len(chosen)))]
        strokes = list(parent.strokes)
        k = int(rng.integers(STROKES))
        old = np.array(strokes[k]).reshape(3, 2)
        if rng.uniform() < 0.5:
            new = np.array(_stroke(rng)).reshape(3, 2)
        else:  # shift one end point and the control point
            new = old.copy()
            new[int(rng.integers(2)) * 2] += rng.uniform(-0.6, 0.6, size=2)
            new[1] += rng.uniform(-0.6, 0.6, size=2)
            new = np.clip(new, -0.9, 0.9)
        if np.abs(new - old).max() < MIN_MOVE:
            continue
        strokes[k] = tuple(float(v) for v in np.round(new.ravel(), 4))
        chosen.append(GlyphSpec(tuple(strokes), parent.root))
    order = rng.permutation(classes)
    return [chosen[i] for i in order]


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> tuple[int, ...]:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
    return tuple(int(255 * c) for c in rgb)


def _curve(points: np.ndarray) -> np.ndarray:
    """CURVE_POINTS points of the quadratic Bezier curve with control points `points` (3 x 2)."""
    t = np.linspace(0.0, 1.0, CURVE_POINTS)[:, None]
    return (1 - t) ** 2 * points[0] + 2 * (1 - t) * t * points[1] + t ** 2 * points[2]


def _background(rng: np.random.Generator, side: int, dark: bool) -> Image.Image:
    """A base colour (dark or light) plus three faint random plane waves, each in its own colour:
    texture without a class cue, and an ink of the opposite lightness stays visible on it."""
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / side
    pixels = np.broadcast_to(np.array(_colour(rng, (0.0, 0.6), (0.1, 0.35) if dark else (0.7, 0.95)), np.float32),
                             (side, side, 3)).copy()
    for _ in range(3):
        angle, freq, phase = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 6.0), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xs * np.cos(angle) + ys * np.sin(angle)) + phase)
        pixels += 0.12 * wave[..., None] * np.array(_colour(rng, (0.0, 0.7), (0.3, 1.0)), np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render_image(spec: GlyphSpec, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB instance of glyph `spec` at `size` x `size`, nuisances drawn from `rng`."""
    side = size * SUPERSAMPLE
    dark = bool(rng.integers(2))
    image = _background(rng, side, dark)
    ink_value = (0.75, 1.0) if dark else (0.05, 0.35)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):  # clutter: thin random strokes in ink-like colours anywhere
        points = rng.uniform(-0.2, 1.2, size=(3, 2)) * side
        draw.line([tuple(p) for p in _curve(points)], fill=_colour(rng, (0.3, 1.0), ink_value),
                  width=max(1, int(rng.uniform(0.01, 0.02) * side)), joint="curve")

    angle = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    scale = rng.uniform(0.38, 0.46) * side
    centre = side / 2 + rng.uniform(-0.08, 0.08, size=2) * side
    to_image = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    ink = _colour(rng, (0.5, 1.0), ink_value)
    width = max(2, int(rng.uniform(0.045, 0.075) * side))
    for stroke in spec.strokes:
        points = np.array(stroke).reshape(3, 2) + rng.normal(0.0, WOBBLE, size=(3, 2))
        curve = _curve(points) @ to_image.T + centre
        draw.line([tuple(p) for p in curve], fill=ink, width=width, joint="curve")
        for end in (curve[0], curve[-1]):  # round caps
            r = width / 2
            draw.ellipse([end[0] - r, end[1] - r, end[0] + r, end[1] + r], fill=ink)

    image = image.resize((size, size), Image.BOX)
    blur = rng.uniform(0.0, 0.8)
    if blur > 0.15:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * rng.uniform(0.85, 1.15, size=3) + rng.normal(0.0, rng.uniform(0.0, 7.0), size=pixels.shape)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
