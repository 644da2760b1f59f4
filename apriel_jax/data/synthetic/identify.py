"""Identification probes: one shape on a grey background; the question asks for its colour or its shape.

They test whether a model looks at the image at all. The question text is the same for every sample and
the answer classes are drawn uniformly, so without the pixels no answer beats ``1 / number of classes``;
an accuracy far above that can only come from the image. ``difficulty`` widens the class set (easy: the
first few colours / shapes of the palette, hard: all of them), shrinks the shape and adds background noise.
"""

from __future__ import annotations

from .common import chat_sample, check_difficulty, lerp
from .shapes import CATEGORIES, COLORS, render_scene

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
        d, side = self.difficulty, min(self.size)
        return render_scene(rng, size=self.size, num_objects=(1, 1), colors=colors, categories=categories,
                            min_size=max(4, round(side * lerp(0.5, 0.25, d))),
                            max_size=max(4, round(side * lerp(0.75, 0.4, d))), noise=lerp(0.0, 0.5, d))


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
    """"What shape is in the image?" -> "circle"; 3 (easy) to 6 (hard) shapes, any colour."""

    name = "shape"
    question = "What shape is in the image? Answer with one word."

    def classes(self) -> tuple[str, ...]:
        return CATEGORIES[:round(lerp(3, len(CATEGORIES), self.difficulty))]

    def __call__(self, rng, image=None, annotations=None) -> dict:
        image, (obj,) = self._scene(rng, tuple(COLORS), self.classes())
        return chat_sample(self.name, image, self.question, obj.category, {"category": obj.category},
                           self.difficulty)
