"""Identification probes: one shape on a grey background; the question asks for its colour or its shape.

They test whether a model looks at the image at all. The question text is the same for every sample and
the answer classes are drawn uniformly, so without the pixels no answer beats ``1 / number of classes``;
an accuracy far above that can only come from the image. ``difficulty`` widens the class set (easy: the
first few colours / shapes of the palette, hard: all of them), shrinks the shape, moves it off the centre and
adds background noise. At the easiest setting the shape is large and centred, so a small vision encoder sees
the same outline in the same patches whatever the sample; at the hardest it may be anywhere in the image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .common import chat_sample, check_difficulty, lerp
from .shapes import CATEGORIES, COLORS, ObjectAnnotation, _background, _object_mask

__all__ = ["ColorTask", "ShapeTask"]


class _IdentifyTask:
    name = ""
    needs_annotations = True
    question = ""

    def __init__(self, difficulty: float = 0.5, size: tuple[int, int] = (256, 256)):
        self.difficulty = check_difficulty(difficulty)
        self.size = size

    def classes(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _scene(self, rng, colors, categories):
        """One shape on a grey background: its side from 5/8-3/4 (easy) to 1/4-2/5 (hard) of the image's short
        side, its position from centred (easy) to anywhere (hard); ``(image, [annotation])``."""
        d, (h, w) = self.difficulty, self.size
        side = min(h, w)
        lo = max(4, round(side * lerp(0.625, 0.25, d)))
        s = int(rng.integers(lo, max(lo, round(side * lerp(0.75, 0.4, d))) + 1))
        cx, cy = (w - s) / 2, (h - s) / 2  # the centred corner; d scales how far the shape may move from it
        x0 = int(round(cx + d * rng.uniform(-cx, cx)))
        y0 = int(round(cy + d * rng.uniform(-cy, cy)))
        category = str(categories[int(rng.integers(len(categories)))])
        color = str(colors[int(rng.integers(len(colors)))])
        pixels = _background(rng, h, w, lerp(0.0, 0.5, d))
        mask = _object_mask(category, (h, w), x0, y0, s, rng)
        pixels[mask] = COLORS[color]
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        return Image.fromarray(pixels, "RGB"), [ObjectAnnotation(category, color, box)]


class ColorTask(_IdentifyTask):
    """"What colour is the shape?" -> "red"; 4 (easy) to 8 (hard) colours, any shape."""

    name = "color"
    question = "What colour is the shape in the image? Answer with one word."

    def classes(self) -> tuple[str, ...]:
        return tuple(COLORS)[:round(lerp(4, len(COLORS), self.difficulty))]

    def __call__(self, rng, image=None, annotations=None) -> dict:
        image, (obj,) = self._scene(rng, self.classes(), CATEGORIES)
        return chat_sample(self.name, image, self.question, obj.color, {"color": obj.color}, self.difficulty)


class ShapeTask(_IdentifyTask):
    """"What shape is in the image?" -> "circle"; 3 (easy) to 6 (hard) shapes, drawn in one colour (easy) to
    any of the palette (hard): at the easiest setting the outline is the only thing that varies."""

    name = "shape"
    question = "What shape is in the image? Answer with one word."

    def classes(self) -> tuple[str, ...]:
        return CATEGORIES[:round(lerp(3, len(CATEGORIES), self.difficulty))]

    def __call__(self, rng, image=None, annotations=None) -> dict:
        colors = tuple(COLORS)[:round(lerp(1, len(COLORS), self.difficulty))]
        image, (obj,) = self._scene(rng, colors, self.classes())
        return chat_sample(self.name, image, self.question, obj.category, {"category": obj.category},
                           self.difficulty)
