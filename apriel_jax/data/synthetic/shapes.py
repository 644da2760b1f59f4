"""Image sources for the synthetic visual-reasoning tasks of CPT stage 2.

Two sources:

* :func:`render_scene` draws flat-coloured geometric shapes on a (optionally noisy) grey
  background and returns exact ground truth. Exactness is the point: counting accuracy and
  detection IoU are only meaningful evaluations if the labels are right by construction.
* :class:`ImageFolderSource` lists real photos for the tasks that need no annotations
  (masked-region colour, crop matching).

Ground-truth guarantees of :func:`render_scene` (tests check them against the pixels):

* Shapes are drawn without anti-aliasing, so every pixel of an object has exactly its
  palette colour.
* Every palette colour has at least one channel outside ``[BG_MIN, BG_MAX]`` while the
  background is clipped into that range, so no background pixel can ever equal an object
  colour, whatever the noise level.
* ``ObjectAnnotation.box`` is the tight bounding box of the object's drawn pixels (computed
  from its mask, not from the nominal placement), half-open: ``x0 <= x < x1``.
* With ``allow_overlap=False`` (default) the boxes of different objects are at least
  ``MIN_GAP`` pixels apart, so objects never touch even diagonally and each one is a
  separate connected component -- counts are unambiguous.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from apriel_jax.data.images import load_image

__all__ = [
    "BG_MAX",
    "BG_MIN",
    "CATEGORIES",
    "COLORS",
    "ImageFolderSource",
    "MIN_GAP",
    "ObjectAnnotation",
    "plural",
    "render_grid_scene",
    "render_scene",
]

# Saturated, mutually distinct colours whose names a language model can reasonably use.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "cyan": (30, 200, 210),
    "pink": (240, 110, 180),
}
CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")

# Background channel range; see the module docstring for why it excludes every palette colour.
BG_MIN, BG_MAX = 60, 200
MIN_GAP = 2  # pixels of background between two objects' boxes when overlap is not allowed


@dataclass(frozen=True)
class ObjectAnnotation:
    category: str
    color: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, half-open

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


def plural(category: str) -> str:
    # every category name above pluralises regularly
    return category + "s"


def _shape_polygon(category: str, x0: float, y0: float, s: float, rng: np.random.Generator):
    """Polygon vertices (or None for an ellipse) of a shape inscribed in the square [x0, x0+s)."""
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    if category == "square":
        return [(x0, y0), (x0 + s - 1, y0), (x0 + s - 1, y0 + s - 1), (x0, y0 + s - 1)]
    if category == "triangle":
        return [(cx, y0), (x0 + s - 1, y0 + s - 1), (x0, y0 + s - 1)]
    if category == "diamond":
        return [(cx, y0), (x0 + s - 1, cy), (cx, y0 + s - 1), (x0, cy)]
    if category == "hexagon":
        return [(cx + (r - 0.5) * math.cos(a), cy + (r - 0.5) * math.sin(a))
                for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
    if category == "star":
        # a random rotation gives the star some variety; the inner radius keeps it recognisable
        phase = float(rng.uniform(0, 2 * math.pi / 5))
        pts = []
        for k in range(10):
            rad = (r - 0.5) if k % 2 == 0 else (r - 0.5) * 0.45
            a = phase + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if category == "circle":
        return None
    raise ValueError(f"unknown shape category {category!r}; known: {CATEGORIES}")


def _object_mask(category: str, size_hw, x0: int, y0: int, s: int, rng) -> np.ndarray:
    mask = Image.new("1", (size_hw[1], size_hw[0]), 0)
    draw = ImageDraw.Draw(mask)
    poly = _shape_polygon(category, x0, y0, s, rng)
    if poly is None:
        draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=1)
    else:
        draw.polygon(poly, fill=1)
    return np.asarray(mask, dtype=bool)


def _background(rng: np.random.Generator, h: int, w: int, noise: float) -> np.ndarray:
    """Grey background; ``noise`` in [0, 1] adds a smooth gradient plus per-pixel noise."""
    base = rng.uniform(BG_MIN + 20, BG_MAX - 20)
    bg = np.full((h, w, 3), base, dtype=np.float32)
    if noise > 0:
        # low-frequency texture: a random tilted gradient with a slight colour cast
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None]
        bg += ramp * rng.uniform(-40, 40, size=3).astype(np.float32) * noise
        bg += rng.normal(0, 25 * noise, size=(h, w, 3)).astype(np.float32)
    return np.clip(np.rint(bg), BG_MIN, BG_MAX).astype(np.uint8)


def _boxes_clash(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def render_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = (256, 256),
    num_objects: tuple[int, int] = (1, 6),
    categories: Sequence[str] = CATEGORIES,
    colors: Sequence[str] = tuple(COLORS),
    min_size: int = 16,
    max_size: int | None = None,
    allow_overlap: bool = False,
    noise: float = 0.0,
    max_attempts: int = 200,
) -> tuple[Image.Image, list[ObjectAnnotation]]:
    """Draw a scene of shapes; returns ``(RGB image, annotations in drawing order)``.

    ``size`` is (H, W); ``num_objects`` an inclusive (lo, hi) range; ``min_size``/``max_size``
    bound the side of each shape's square footprint (``max_size`` defaults to a quarter of the
    short side). If the requested count cannot be placed without overlap within
    ``max_attempts`` tries per object, fewer objects are drawn -- the annotations always
    describe exactly what is in the image. With ``allow_overlap=True`` later objects may hide
    parts of earlier ones; their boxes still cover the full (partly hidden) shape.
    Deterministic given the state of ``rng``.
    """
    h, w = size
    lo, hi = num_objects
    if not 0 <= lo <= hi:
        raise ValueError(f"bad num_objects range {num_objects}")
    unknown = [c for c in colors if c not in COLORS]
    if unknown:
        raise ValueError(f"unknown colours {unknown}; known: {tuple(COLORS)}")
    max_size = max_size or max(min_size, min(h, w) // 4)
    if not 2 <= min_size <= max_size <= min(h, w):
        raise ValueError(f"object size range [{min_size}, {max_size}] does not fit image {size}")

    pixels = _background(rng, h, w, noise)
    target = int(rng.integers(lo, hi + 1))
    annotations: list[ObjectAnnotation] = []
    for _ in range(target):
        for _attempt in range(max_attempts):
            s = int(rng.integers(min_size, max_size + 1))
            x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            footprint = (x0, y0, x0 + s, y0 + s)
            if allow_overlap or not any(_boxes_clash(footprint, a.box, MIN_GAP) for a in annotations):
                break
        else:
            break  # scene is full: keep what fits rather than loop forever
        annotations.append(_draw_object(pixels, rng, size, categories, colors, x0, y0, s))
    return Image.fromarray(pixels, "RGB"), annotations


def _draw_object(pixels, rng, size, categories, colors, x0: int, y0: int, s: int) -> ObjectAnnotation:
    """Draw one object of a random category and colour in the ``s``-px square at (x0, y0) into ``pixels``;
    its annotation, with the tight bounding box of the pixels drawn."""
    category = str(categories[int(rng.integers(len(categories)))])
    color = str(colors[int(rng.integers(len(colors)))])
    mask = _object_mask(category, size, x0, y0, s, rng)
    ys, xs = np.nonzero(mask)
    pixels[mask] = COLORS[color]
    return ObjectAnnotation(category, color, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def render_grid_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = (256, 256),
    grid: int = 2,
    count: int = 1,
    categories: Sequence[str] = CATEGORIES,
    colors: Sequence[str] = tuple(COLORS),
    fill: float = 0.875,
    jitter: float = 0.0,
    noise: float = 0.0,
) -> tuple[Image.Image, list[ObjectAnnotation]]:
    """Draw ``count`` shapes in distinct cells of a ``grid`` x ``grid`` grid; ``(RGB image, annotations)``.

    Each object's square footprint is ``fill`` of its cell's short side (at most the side less ``MIN_GAP``)
    and sits at the cell's centre, moved towards a random point of the cell by ``jitter`` in [0, 1], keeping
    1 px of every cell clear. The cells are chosen at random without replacement, so objects never share a
    cell and are at least ``MIN_GAP`` pixels apart, as in :func:`render_scene`. When the cells match a vision
    encoder's patches, each object lies in one patch and the count is the number of patches that show one.
    """
    h, w = size
    if grid < 1 or not 0 <= count <= grid * grid:
        raise ValueError(f"cannot place {count} objects in a {grid} x {grid} grid")
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    ch, cw = h // grid, w // grid
    s = min(int(round(min(ch, cw) * fill)), min(ch, cw) - MIN_GAP)
    if s < 2:
        raise ValueError(f"{cw} x {ch} px cells are too small for objects {MIN_GAP} px apart")
    pixels = _background(rng, h, w, noise)
    annotations: list[ObjectAnnotation] = []
    for cell in sorted(rng.choice(grid * grid, size=count, replace=False)):
        row, col = divmod(int(cell), grid)
        # the centred corner, and how far it may move inside the cell (1 px kept clear on every side)
        cx, cy = col * cw + (cw - s) / 2, row * ch + (ch - s) / 2
        slack_x, slack_y = max(0.0, (cw - s) / 2 - 1), max(0.0, (ch - s) / 2 - 1)
        x0 = int(round(cx + jitter * rng.uniform(-slack_x, slack_x)))
        y0 = int(round(cy + jitter * rng.uniform(-slack_y, slack_y)))
        annotations.append(_draw_object(pixels, rng, size, categories, colors, x0, y0, s))
    return Image.fromarray(pixels, "RGB"), annotations


class ImageFolderSource:
    """Random-access list of the real images under ``path`` (recursively), in sorted order.

    Only paths are held, so the source pickles cheaply into data-loader workers; images are
    decoded on access and converted to RGB.
    """

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

    def __init__(self, path: str | os.PathLike, extensions: Sequence[str] = EXTENSIONS):
        exts = tuple(e.lower() for e in extensions)
        self.root = os.fspath(path)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist")
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            found.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(exts))
        self.paths = sorted(found)
        if not self.paths:
            raise FileNotFoundError(f"no {exts} images under {self.root!r}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return load_image(self.paths[index]).convert("RGB")  # upright (EXIF orientation applied)

    def sample(self, rng: np.random.Generator) -> Image.Image:
        return self[int(rng.integers(len(self)))]
