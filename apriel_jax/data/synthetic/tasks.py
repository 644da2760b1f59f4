"""Synthetic visual-reasoning tasks (Apriel CPT stage 2): image (+ ground truth) -> chat sample.

Every task is a small class with a ``difficulty`` knob in [0, 1] and is called as
``task(rng, image=None, annotations=None)``. Without an image it renders its own shape scene
(:func:`render_scene`) with parameters derived from the difficulty; tasks that need
annotations (counting, detection, shape reconstruction) always use shape scenes, the others
also accept real photos. Every sample has the form::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": PIL.Image},
                                               {"type": "text", "text": question}]},
                  {"role": "assistant", "content": answer_text}],
     "task": name, "answer": structured ground truth, "difficulty": float}

Box convention in text: ``(x0, y0, x1, y1)`` scaled to integers in 0..1000 of the image's
width/height, so answers do not depend on the resolution the model sees.

Matching puts the reference crop and the K candidates into ONE composed image (reference on
top, labelled candidate tiles below). One image keeps the sample's token count fixed and
matches how a single-image chat model is prompted; see :mod:`.matching`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .common import chat_sample, check_difficulty, lerp
from .identify import ColorTask, ShapeTask
from .matching import MatchingTask
from .shapes import CATEGORIES, COLORS, plural, render_grid_scene, render_scene

__all__ = [
    "ColorTask",
    "CountingTask",
    "DEFAULT_TASKS",
    "DetectionTask",
    "MatchingTask",
    "ReconstructionTask",
    "ShapeTask",
    "TASKS",
    "TaskMixture",
    "dominant_color",
    "normalize_box",
    "pixel_color_names",
]

MASK_FILL = (128, 128, 128)
MASK_OUTLINE = (40, 40, 40)


def normalize_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (half-open) -> integers in the 0..1000 convention used in the text answers."""
    x0, y0, x1, y1 = box
    return (round(x0 * 1000 / width), round(y0 * 1000 / height), round(x1 * 1000 / width), round(y1 * 1000 / height))


def _subset(rng: np.random.Generator, items: Sequence[str], n: int) -> tuple[str, ...]:
    n = max(1, min(n, len(items)))
    return tuple(items[i] for i in sorted(rng.choice(len(items), size=n, replace=False)))


class _ShapeTask:
    """Shared scene set-up: harder = more, smaller objects, more kinds, noisier background."""

    name = ""
    needs_annotations = True

    def __init__(self, difficulty: float = 0.5, size: tuple[int, int] = (256, 256)):
        self.difficulty = check_difficulty(difficulty)
        self.size = size

    def _kinds(self, rng) -> tuple[tuple[str, ...], tuple[str, ...]]:
        d = self.difficulty
        return _subset(rng, CATEGORIES, round(lerp(2, 6, d))), _subset(rng, tuple(COLORS), round(lerp(2, 8, d)))

    def scene_kwargs(self, rng: np.random.Generator) -> dict:
        d = self.difficulty
        scale = min(self.size) / 256  # sizes below are tuned for 256 px scenes
        categories, colors = self._kinds(rng)
        return dict(
            size=self.size,
            num_objects=(1, round(lerp(4, 14, d))),
            categories=categories,
            colors=colors,
            min_size=max(4, round(lerp(36, 12, d) * scale)),
            max_size=max(4, round(lerp(64, 36, d) * scale)),
            noise=lerp(0.0, 0.8, d),
        )

    def _scene(self, rng, image, annotations):
        if image is None or annotations is None:
            image, annotations = render_scene(rng, **self.scene_kwargs(rng))
        return image, list(annotations)


class CountingTask(_ShapeTask):
    """"How many red triangles are there?" -> "3". Asks about total / category / colour / both;
    about 15% of filtered questions ask for an attribute absent from the scene (answer 0).

    Below ``GRID_DIFFICULTY`` the scene is a grid (:func:`render_grid_scene`): the image is cut into 2 x 2
    cells, 1-4 of them (uniformly) hold one shape each and the question asks for the total. At difficulty 0
    every shape fills its cell (7/8 of its side), sits at its centre and is one of 3 outlines, all drawn in
    one colour on a flat background; towards ``GRID_DIFFICULTY`` the shapes shrink to half a cell, move
    anywhere inside it and take any outline and colour, on a noisier background. At 32 px the cells are the
    patches of a 16 px-patch vision encoder, so the count is the number of patches that show a shape: the
    easiest counting there is (the demo's tiny model learns it in CPT-2; with 2 colours per scene it learned
    it slower, with 2 of all 8 not within 80 steps from scratch). From ``GRID_DIFFICULTY`` on, the shapes are
    placed freely (:func:`render_scene`), more and smaller ones the harder it gets, and the question may
    filter them by shape and colour.
    """

    name = "counting"
    GRID_DIFFICULTY = 0.25
    GRID = 2

    def _grid_scene(self, rng):
        t = self.difficulty / self.GRID_DIFFICULTY  # 0 -> 1 across the grid regime
        colors = tuple(COLORS)[:round(lerp(1, len(COLORS), t))]
        categories = CATEGORIES[:round(lerp(3, len(CATEGORIES), t))]
        count = int(rng.integers(1, self.GRID * self.GRID + 1))
        return render_grid_scene(rng, size=self.size, grid=self.GRID, count=count, categories=categories,
                                 colors=colors, fill=lerp(0.875, 0.5, t), jitter=t, noise=lerp(0.0, 0.25, t))

    def __call__(self, rng, image=None, annotations=None) -> dict:
        grid = (image is None or annotations is None) and self.difficulty < self.GRID_DIFFICULTY
        if grid:
            image, anns = self._grid_scene(rng)
            kind = "total"
        else:
            image, anns = self._scene(rng, image, annotations)
            kind = ("total", "category", "color", "both")[int(rng.integers(4))]
        cat = col = None
        if kind != "total":
            if anns and rng.random() >= 0.15:
                ref = anns[int(rng.integers(len(anns)))]
                cat, col = ref.category, ref.color
            else:
                cat = str(CATEGORIES[int(rng.integers(len(CATEGORIES)))])
                col = str(tuple(COLORS)[int(rng.integers(len(COLORS)))])
            cat = cat if kind in ("category", "both") else None
            col = col if kind in ("color", "both") else None
        count = sum(1 for a in anns if (cat is None or a.category == cat) and (col is None or a.color == col))
        noun = plural(cat) if cat else "shapes"
        what = f"{col} {noun}" if col else noun
        templates = (f"How many {what} are there in the image?", f"Count the {what} in this image.",
                     f"How many {what} can you see?")
        question = templates[int(rng.integers(len(templates)))] + " Answer with a number."
        answer = {"count": count, "category": cat, "color": col}
        return chat_sample(self.name, image, question, str(count), answer, self.difficulty)


class DetectionTask(_ShapeTask):
    """"Is there a blue circle? If so, where?" -> "Yes, at about (x0, y0, x1, y1)." or "No.".

    Only (colour, category) pairs that occur at most once are asked about, so the box is
    unambiguous. Harder scenes draw from FEWER kinds, so distractors share the target's colour
    or shape, and contain more, smaller objects.
    """

    name = "detection"

    def _kinds(self, rng):
        d = self.difficulty
        return _subset(rng, CATEGORIES, round(lerp(6, 3, d))), _subset(rng, tuple(COLORS), round(lerp(8, 3, d)))

    def __call__(self, rng, image=None, annotations=None) -> dict:
        image, anns = self._scene(rng, image, annotations)
        pairs = [(a.color, a.category) for a in anns]
        unique = [a for a in anns if pairs.count((a.color, a.category)) == 1]
        absent = [(c, k) for c in COLORS for k in CATEGORIES if (c, k) not in pairs]
        # prefer absent pairs made of attributes that ARE in the scene: a harder "no"
        near = [p for p in absent if p[0] in {a.color for a in anns} or p[1] in {a.category for a in anns}]
        absent = near or absent
        if unique and (rng.random() < 0.5 or not absent):
            target = unique[int(rng.integers(len(unique)))]
            color, category = target.color, target.category
            box = normalize_box(target.box, *image.size)
            text = "Yes, at about ({}, {}, {}, {}).".format(*box)
            answer = {"present": True, "box": box, "box_pixels": target.box, "color": color, "category": category}
        else:
            color, category = absent[int(rng.integers(len(absent)))]
            text = "No."
            answer = {"present": False, "box": None, "box_pixels": None, "color": color, "category": category}
        question = (f"Is there a {color} {category} in the image? If so, where? Give its bounding box as "
                    "(x0, y0, x1, y1) with coordinates scaled to 0-1000.")
        return chat_sample(self.name, image, question, text, answer, self.difficulty)


# ---------------------------------------------------------------- reconstruction


_HUE_NAMES = ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"),
              (255, "blue"), (290, "purple"), (340, "pink"), (361, "red"))


def pixel_color_names(rgb: np.ndarray) -> np.ndarray:
    """Coarse colour name of every pixel of an [..., 3] uint8 array (HSV thresholds)."""
    hsv = np.asarray(Image.fromarray(rgb.reshape(-1, 1, 3).astype(np.uint8), "RGB").convert("HSV"),
                     dtype=np.float32).reshape(rgb.shape)
    hue, sat, val = hsv[..., 0] * 360 / 256, hsv[..., 1], hsv[..., 2]
    names = np.full(rgb.shape[:-1], "grey", dtype=object)
    edges = np.array([e for e, _ in _HUE_NAMES])
    hue_names = np.array([n for _, n in _HUE_NAMES], dtype=object)[np.searchsorted(edges, hue, side="right")]
    chromatic = sat >= 60
    names[chromatic] = hue_names[chromatic]
    # dark oranges/reds read as brown
    names[chromatic & (val < 150) & np.isin(hue_names, ["orange"])] = "brown"
    names[~chromatic & (val > 200)] = "white"
    names[val < 50] = "black"
    return names


def dominant_color(rgb: np.ndarray) -> tuple[str, float]:
    """(most frequent pixel colour name, its fraction) of an [h, w, 3] uint8 region."""
    names, counts = np.unique(pixel_color_names(rgb).ravel(), return_counts=True)
    best = int(np.argmax(counts))
    return str(names[best]), float(counts[best] / counts.sum())


def _mask(image: Image.Image, box) -> Image.Image:
    """Copy of ``image`` with pixel box (half-open) covered by an outlined grey rectangle."""
    out = image.copy()
    x0, y0, x1, y1 = box
    ImageDraw.Draw(out).rectangle([x0, y0, x1 - 1, y1 - 1], fill=MASK_FILL, outline=MASK_OUTLINE)
    return out


class ReconstructionTask(_ShapeTask):
    """A grey box hides one region; the question asks what was there.

    Shape scenes: the box covers exactly one object (its box grown by 1 px, which stays in the
    >= 2 px gap to any neighbour), answer "A red triangle.". Real images (no annotations): the
    box hides a random region and the answer is its dominant pixel colour; easy samples only use
    regions whose dominant colour covers >= 70% of pixels, hard ones go down to 40%.
    """

    name = "reconstruction"
    needs_annotations = False

    def __call__(self, rng, image=None, annotations=None) -> dict:
        if image is not None and annotations is None:
            return self._colour_variant(rng, image)
        image, anns = self._scene(rng, image, annotations)
        if not anns:  # nothing to hide: fall back to the pixel-colour variant
            return self._colour_variant(rng, image)
        target = anns[int(rng.integers(len(anns)))]
        w, h = image.size
        x0, y0, x1, y1 = target.box
        box = (max(0, x0 - 1), max(0, y0 - 1), min(w, x1 + 1), min(h, y1 + 1))
        question = ("Part of the image is covered by a grey box. What object is hidden under the grey box? "
                    "Name its colour and shape.")
        text = f"A {target.color} {target.category}."
        answer = {"kind": "object", "color": target.color, "category": target.category, "mask_box": box}
        return chat_sample(self.name, _mask(image, box), question, text, answer, self.difficulty)

    def _colour_variant(self, rng, image: Image.Image) -> dict:
        d = self.difficulty
        w, h = image.size
        pixels = np.asarray(image.convert("RGB"))
        threshold = lerp(0.7, 0.4, d)
        best = None
        for _ in range(24):
            bw = max(2, round(w * rng.uniform(0.15, 0.35)))
            bh = max(2, round(h * rng.uniform(0.15, 0.35)))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            name, frac = dominant_color(pixels[y0:y0 + bh, x0:x0 + bw])
            if best is None or frac > best[2]:
                best = (box, name, frac)
            if frac >= threshold:
                break
        box, name, frac = best
        question = ("Part of the image is covered by a grey box. What is the dominant colour of the hidden "
                    "region? Answer with one colour word.")
        answer = {"kind": "color", "color": name, "fraction": frac, "mask_box": box}
        return chat_sample(self.name, _mask(image, box), question, f"Mostly {name}.", answer, self.difficulty)



# ---------------------------------------------------------------- mixture

TASKS = {t.name: t for t in (CountingTask, DetectionTask, MatchingTask, ReconstructionTask, ColorTask, ShapeTask)}
# The paper's four task families; the colour and shape probes (.identify) are asked for by name.
DEFAULT_TASKS = ("counting", "detection", "matching", "reconstruction")


class TaskMixture:
    """Random-access dataset of synthetic samples: item ``i`` depends only on ``(seed, start + i)``.

    Each index seeds its own generator (``SeedSequence([seed, index])``), so any item can be
    produced in any order by any worker (grain ``RandomAccessDataSource``: ``__len__`` and
    ``__getitem__``), and splits are disjoint by construction when they use different seeds or
    non-overlapping ``[start, start + length)`` index ranges.

    ``weights``: task name -> relative weight (default: the four ``DEFAULT_TASKS`` equally). ``difficulty``: one
    value for every task or a task name -> value dict. ``image_source``: optional random-access
    source of real images (e.g. :class:`ImageFolderSource`); tasks that need no annotations then
    use a real image with probability ``real_image_prob`` (downscaled to ``max_real_side``).
    """

    def __init__(self, weights: dict[str, float] | None = None, difficulty: float | dict[str, float] = 0.5,
                 seed: int = 0, length: int = 1_000_000, start: int = 0, image_source=None,
                 real_image_prob: float = 0.5, size: tuple[int, int] = (256, 256), max_real_side: int = 512):
        weights = dict(weights) if weights is not None else {name: 1.0 for name in DEFAULT_TASKS}
        unknown = set(weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {sorted(TASKS)}")
        if any(v < 0 for v in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"task weights must be >= 0 with a positive sum, got {weights}")
        self.names = sorted(n for n, v in weights.items() if v > 0)
        total = sum(weights[n] for n in self.names)
        self.probs = np.array([weights[n] / total for n in self.names])
        levels = difficulty if isinstance(difficulty, dict) else {n: difficulty for n in self.names}
        self.tasks = {n: TASKS[n](difficulty=levels.get(n, 0.5), size=size) for n in self.names}
        self.seed, self.length, self.start = int(seed), int(length), int(start)
        self.image_source, self.real_image_prob, self.max_real_side = image_source, real_image_prob, max_real_side

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} samples")
        return self.sample(self.start + (i % self.length))

    def sample(self, index: int) -> dict:
        """The sample at absolute ``index`` (ignores ``start``/``length``)."""
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(index)]))
        name = self.names[int(rng.choice(len(self.names), p=self.probs))]
        task = self.tasks[name]
        image = None
        if self.image_source is not None and not task.needs_annotations and rng.random() < self.real_image_prob:
            # copy: a caching source must not see its images shrunk in place
            image = self.image_source[int(rng.integers(len(self.image_source)))].copy()
            image.thumbnail((self.max_real_side, self.max_real_side))
        return task(rng, image=image)
