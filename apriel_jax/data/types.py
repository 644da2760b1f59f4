"""The unit every data source produces and the packer consumes: one tokenized document.

A chat sample, a plain-text document, a synthetic visual task or a pre-tokenized ArrayRecord record
all become a :class:`Document`; the packer (``packing.py``) turns documents into the fixed-shape rows
of the batch contract. Keeping this one small type between the stages is what lets sources, chat
formats and packing evolve independently.

Conventions:
- ``tokens[i]`` is the i-th input id; ``loss_mask[i]`` says whether token ``i`` is a *target*, i.e.
  whether predicting it from ``tokens[:i]`` counts in the loss (so ``loss_mask[0]`` never counts: the
  first token of a document has nothing to be predicted from).
- Images appear in ``tokens`` as Pixtral's layout (rows of ``[IMG]`` ending in ``[IMG_BREAK]``, the last
  in ``[IMG_END]``); ``images[k]`` holds the patches of the k-th image in token order, row-major, so
  the j-th ``[IMG]`` token of the document receives the j-th patch of the concatenated images.
  ``[IMG]`` tokens never carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class ImagePatches(NamedTuple):
    """One image as the batch takes it; the one image type of the data pipeline.

    A tuple so that ``patches, positions = image`` works where a pair is natural (``encode_prompt``).
    """

    patches: np.ndarray  # [N, p*p*C] float32, normalised, (row, col, channel) flattened
    positions: np.ndarray  # [N, 2] int32 (row, col) in the image's patch grid

    @property
    def num_patches(self) -> int:
        return int(self.patches.shape[0])


@dataclass
class Document:
    tokens: np.ndarray  # [n] int32
    loss_mask: np.ndarray  # [n] float32 in {0, 1}: token i is a target
    images: list[ImagePatches] = field(default_factory=list)
    source: str = ""  # mixture component it came from (for realised-proportion statistics)
    skip_reason: str = ""  # set on the empty Document of a skipped record: why (data.errors.REASONS)

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, np.int32)
        self.loss_mask = np.asarray(self.loss_mask, np.float32)
        if self.tokens.ndim != 1 or self.tokens.shape != self.loss_mask.shape:
            raise ValueError(f"tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} must be equal 1-D")

    @classmethod
    def skipped(cls, reason: str) -> "Document":
        """The empty Document that stands for a record skipped for ``reason`` (counted, then dropped by the packer)."""
        return cls(np.zeros(0, np.int32), np.zeros(0, np.float32), skip_reason=reason)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_patches(self) -> int:
        return sum(image.num_patches for image in self.images)
