"""Visual matching: which labelled candidate crop shows the same region as the reference crop?

Everything goes into ONE composed image: the reference tile on top, the K candidate tiles
(labelled A, B, ...) below in rows of three. A single image keeps the sample a plain
single-image chat turn and lets the labels sit right next to what they name.

Construction (all pixel boxes half-open):

* reference: the most textured of a few random square crops (a crop of flat background would
  make the question unanswerable);
* correct candidate: the same region, shifted and rescaled by up to ``lerp(0, 15%, d)`` /
  ``lerp(0, 30%, d)`` of its side;
* distractors: crops that overlap the reference by IoU < 0.1; at higher difficulty each one is
  the most reference-like of more proposals (similar distractors), but never closer than
  ``MIN_THUMB_DIST`` on coarse thumbnails so the task stays well-posed;
* EVERY candidate gets the same kinds of augmentation (random mirror, colour jitter of strength
  ``lerp(0, 0.35, d)``), so "the altered one" is never a shortcut. At difficulty 0 the correct
  tile is the reference, at most mirrored.

``answer`` records the construction (boxes, mirrors, tile positions) so tests and evaluations
can check the label without trusting the generator.
"""

from __future__ import annotations

import math
import string

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from .common import chat_sample, check_difficulty, lerp
from .shapes import render_scene

__all__ = ["MatchingTask", "box_iou_pixels"]

TILE = 112  # side of every tile in the composed image
PAD = 8
LABEL_H = 20
COLS = 3
MIN_THUMB_DIST = 10.0  # mean abs difference of 16x16 thumbnails a distractor must exceed


def box_iou_pixels(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _thumb(image: Image.Image, box) -> np.ndarray:
    return np.asarray(image.crop(box).resize((16, 16), Image.BOX), dtype=np.float32)


def _random_box(rng, w: int, h: int, side: int):
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return (x0, y0, x0 + side, y0 + side)


def _jittered_box(rng, anchor, w: int, h: int, d: float):
    side0 = anchor[2] - anchor[0]
    side = int(round(side0 * rng.uniform(1 - 0.3 * d, 1 + 0.3 * d)))
    side = max(4, min(side, w, h))
    shift = lerp(0.0, 0.15, d) * side0
    cx = (anchor[0] + anchor[2]) / 2 + rng.uniform(-shift, shift)
    cy = (anchor[1] + anchor[3]) / 2 + rng.uniform(-shift, shift)
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    return (x0, y0, x0 + side, y0 + side)


class MatchingTask:
    name = "matching"
    needs_annotations = False

    def __init__(self, difficulty: float = 0.5, size: tuple[int, int] = (256, 256)):
        self.difficulty = check_difficulty(difficulty)
        self.size = size

    @property
    def num_candidates(self) -> int:
        return 3 + round(3 * self.difficulty)

    def scene_kwargs(self, rng: np.random.Generator) -> dict:
        # busy, textured scenes so that crops have content to match on
        d = self.difficulty
        return dict(size=self.size, num_objects=(8, 16), min_size=max(4, min(self.size) // 16),
                    max_size=max(4, min(self.size) // 5), noise=lerp(0.3, 0.8, d))

    def _distractor(self, rng, image, anchor, anchor_thumb, side):
        w, h = image.size
        wanted = 1 + round(lerp(0, 11, self.difficulty))  # proposals to pick the most similar from
        best, fallback = None, None
        for _ in range(200):
            box = _random_box(rng, w, h, side)
            if box_iou_pixels(box, anchor) >= 0.1:
                continue
            dist = float(np.abs(_thumb(image, box) - anchor_thumb).mean())
            if fallback is None or dist > fallback[0]:
                fallback = (dist, box)
            if dist <= MIN_THUMB_DIST:
                continue
            wanted -= 1
            if best is None or dist < best[0]:
                best = (dist, box)
            if wanted == 0:
                break
        # a featureless image may offer no distinct crop: take the most different one found
        return (best or fallback or (0.0, _random_box(rng, w, h, side)))[1]

    def _augment(self, rng, tile: Image.Image) -> tuple[Image.Image, bool]:
        mirrored = bool(rng.random() < 0.5)
        if mirrored:
            tile = ImageOps.mirror(tile)
        j = lerp(0.0, 0.35, self.difficulty)
        if j > 0:
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                tile = enhancer(tile).enhance(float(rng.uniform(1 - j, 1 + j)))
        return tile, mirrored

    def __call__(self, rng, image=None, annotations=None) -> dict:
        if image is None:
            image, _ = render_scene(rng, **self.scene_kwargs(rng))
        image = image.convert("RGB")
        w, h = image.size
        d = self.difficulty
        side = max(4, round(min(w, h) * lerp(0.4, 0.3, d)))
        proposals = [_random_box(rng, w, h, side) for _ in range(8)]
        anchor = max(proposals, key=lambda b: float(np.asarray(image.crop(b), dtype=np.float32).std()))
        anchor_thumb = _thumb(image, anchor)

        k = self.num_candidates
        correct = int(rng.integers(k))
        boxes = [_jittered_box(rng, anchor, w, h, d) if i == correct
                 else self._distractor(rng, image, anchor, anchor_thumb, side) for i in range(k)]
        tiles, mirrored = [], []
        for box in boxes:
            tile, m = self._augment(rng, image.crop(box).resize((TILE, TILE), Image.BILINEAR))
            tiles.append(tile)
            mirrored.append(m)
        reference = image.crop(anchor).resize((TILE, TILE), Image.BILINEAR)
        grid, ref_cell, cells = _compose(reference, tiles)

        letters = string.ascii_uppercase[:k]
        question = (f"The image shows a reference crop at the top and {k} candidate crops labelled "
                    f"{letters[0]} to {letters[-1]}. Which candidate shows the same part of the scene as the "
                    "reference? It may be mirrored, rescaled or recoloured. Answer with the letter.")
        answer = {"letter": letters[correct], "index": correct, "num_candidates": k, "anchor_box": anchor,
                  "candidate_boxes": boxes, "mirrored": mirrored, "reference_cell": ref_cell, "cells": cells}
        return chat_sample(self.name, grid, question, letters[correct], answer, d)


def _compose(reference: Image.Image, tiles: list[Image.Image]):
    """Reference on top (centred), labelled candidates below; returns (image, ref cell, cells)."""
    cols = min(COLS, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    width = cols * (TILE + PAD) + PAD
    height = PAD + LABEL_H + TILE + PAD + rows * (LABEL_H + TILE + PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)

    def place(tile, x, y, label):
        draw.text((x + TILE / 2, y + LABEL_H / 2), label, fill=(0, 0, 0), font=font, anchor="mm")
        canvas.paste(tile, (x, y + LABEL_H))
        return (x, y + LABEL_H, x + TILE, y + LABEL_H + TILE)

    ref_cell = place(reference, (width - TILE) // 2, PAD, "Reference")
    cells = []
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y = PAD + LABEL_H + TILE + PAD + r * (LABEL_H + TILE + PAD)
        cells.append(place(tile, PAD + c * (TILE + PAD), y, string.ascii_uppercase[i]))
    return canvas, ref_cell, cells
