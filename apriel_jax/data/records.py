"""Source records -> :class:`Document`: the ``to_document`` callable the pipeline runs in its workers.

Records come from JSONL / ArrayRecord / TFDS sources (``sources.py``), Parquet files (``parquet.py``) or
synthetic task mixtures:

* ``{"text": str}``: ``<s>`` + text + ``</s>``, every token a target (pre-training style).
* ``{"messages": [...], "tools"?: [...]}``: rendered by :class:`~apriel_jax.data.chat.ChatFormat`.
  Image parts may name their image as ``{"path": "rel/or/abs.png"}`` or ``{"image": "path"}``, local
  or ``gs://`` (relative paths resolve against the record's ``_dir``, i.e. its JSONL file's folder), inline
  ``{"image_base64": ...}`` (what ``prepare_array_record`` writes), or an in-memory PIL image / array /
  bytes (synthetic tasks).
* the formats users bring (LLaVA/ShareGPT ``conversations``, OpenAI ``image_url`` parts, ``<image>``
  placeholders with an ``images`` list), converted by :mod:`.formats`.

Every record first goes through :func:`~apriel_jax.data.validate.check_record` (conversion, then every
field checked). A record that fails, or whose image cannot be read or decoded, is an
:class:`~apriel_jax.data.errors.InvalidRecord` naming its ``_where`` (file:line) and a reason;
``on_invalid="skip"`` (default) turns it into an empty Document carrying the reason (counted per reason
in ``skips``, the first few of each reason logged), ``"error"`` raises it. A caption without its image
would teach the model to describe pictures it never saw, so a record with a bad image goes whole.

An image with more patches than ``patch_budget`` (one row's worth) would make its document unpackable;
``oversize_images="downscale"`` shrinks it to the largest size that fits (computed from ``patch_grid``,
so the fit is exact, not approximate), ``"skip"`` refuses the record like an invalid one (reason
``oversize_image``), ``"error"`` raises :class:`ImageError`.

A skipped record's empty Document is counted by the pipeline (per reason) and dropped by the packer.

The tokenizer is loaded lazily and never pickled: grain pickles this object into each worker process,
and each worker loads its own copy on first use. Counters are per process (a worker's counts stay in
that worker): read them in-process (the CLI, tests); a training run counts skips from the Documents
(``PackedBatchIterator.stats``), which works with worker processes too.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from .chat import ChatFormat
from .chat_template import ChatTemplate, ChatTemplateError
from .errors import InvalidRecord
from .image_refs import load_part_image
from .images import ImageConfig, ImageError, patch_grid, resize_like_preprocessing, resized_size, to_rgb
from .tokenizer import Tokenizer, load_tokenizer, pixtral_tekken_path
from .types import Document
from .validate import SkipLog, check_on_invalid, check_record, convert_or_skip

__all__ = ["RecordToDocument", "fit_longest_edge", "resolve_tokenizer_path"]

PIXTRAL = "pixtral"  # keyword for mistral-common's shipped tekken_240911.json


def resolve_tokenizer_path(path) -> str:
    """``"pixtral"`` -> the tekken file shipped with mistral-common; anything else unchanged."""
    return str(pixtral_tekken_path()) if str(path) == PIXTRAL else os.fspath(path)


def fit_longest_edge(height: int, width: int, cfg: ImageConfig, patch_budget: int) -> int:
    """Largest ``longest_edge <= cfg.longest_edge`` whose patch grid for ``height x width`` has at most
    ``patch_budget`` patches.

    The patch count never decreases as ``longest_edge`` grows (the scale ratio only shrinks), so a
    binary search finds the largest fitting value; ``longest_edge=1`` always gives a 1x1 grid.
    """
    if patch_budget < 1:
        raise ValueError(f"patch_budget must be >= 1 to hold any image, got {patch_budget}")

    def count(edge: int) -> int:
        rows, cols = patch_grid(height, width, dataclasses.replace(cfg, longest_edge=edge))
        return rows * cols

    lo, hi = 1, cfg.longest_edge  # invariant: count(lo) fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= patch_budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RecordToDocument:
    """Picklable ``record -> Document`` converter; see the module docstring for formats and policies.

    ``tokenizer``: a tokenizer file/directory path or ``"pixtral"``. ``mode``: a ChatFormat mode.
    ``loss``: ``"responses"`` (chat: assistant turns only) or ``"all"``; text records always train on
    every token. ``patch_budget``: patches per packed row (``None``: no per-image limit).
    ``on_invalid``: ``"skip"`` or ``"error"`` (see the module docstring).
    """

    def __init__(self, tokenizer, mode: str = "apriel", loss: str = "responses",
                 image_cfg: ImageConfig = ImageConfig(), patch_budget: int | None = None,
                 oversize_images: str = "downscale", on_invalid: str = "skip"):
        if loss not in ("responses", "all"):
            raise ValueError(f"loss must be 'responses' or 'all', got {loss!r}")
        if oversize_images not in ("downscale", "skip", "error"):
            raise ValueError(f"oversize_images must be 'downscale', 'skip' or 'error', got {oversize_images!r}")
        if patch_budget is not None and patch_budget < 1:
            raise ValueError(f"patch_budget must be >= 1 (or None), got {patch_budget}")
        self.tokenizer_path = resolve_tokenizer_path(tokenizer)
        # A tokenizer directory that carries a chat template (a checkpoint's) renders with it, as the released
        # model was trained and is prompted; the built-in Apriel renderer gives the same text otherwise.
        template = ChatTemplate.from_checkpoint(self.tokenizer_path) if mode == "apriel" else None
        self.chat = ChatFormat(mode=mode, image_cfg=image_cfg, template=template)  # validates mode
        self.loss, self.patch_budget = loss, patch_budget
        self.oversize_images, self.on_invalid = oversize_images, check_on_invalid(on_invalid)
        self._tokenizer: Tokenizer | None = None
        self.records = 0  # records converted (including skipped ones)
        self.downscaled_images = 0
        self.skips = SkipLog()  # records skipped in this process, per reason

    # ---------------------------------------------------------------- pickling / lazy tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # each process loads its own; tokenizer objects need not pickle
        return state

    # ---------------------------------------------------------------------------- conversion

    def __call__(self, record: dict) -> Document:
        self.records += 1
        return convert_or_skip(lambda: self._convert(record), self.on_invalid, self.skips)

    def _convert(self, record: dict) -> Document:
        record = check_record(record, loss=self.loss, mode=self.chat.mode)
        if "messages" not in record:
            return self._text(record)
        messages = [self._resolve_message(m, i, record) for i, m in enumerate(record["messages"])]
        try:
            return self.chat.encode(messages, self.tokenizer, tools=record.get("tools") or None, loss=self.loss)
        except ImageError as err:  # an image that decoded but is unusable (e.g. a zero-size array)
            raise InvalidRecord(_where(record), "bad_image", str(err)) from err
        except ChatTemplateError as err:  # a conversation the checkpoint's template refuses
            raise InvalidRecord(_where(record), "bad_schema", str(err)) from err

    def _text(self, record: dict) -> Document:
        tok = self.tokenizer
        ids = [tok.bos_id, *tok.encode(record["text"]), tok.eos_id]
        mask = np.ones(len(ids), np.float32)
        mask[0] = 0.0  # nothing precedes <s>
        return Document(np.asarray(ids, np.int32), mask)

    def _resolve_message(self, message: dict, i: int, record: dict) -> dict:
        """The message with each image part's image decoded (and fitted to the patch budget)."""
        content = message.get("content")
        if not isinstance(content, list):
            return message
        parts = []
        for j, part in enumerate(content):
            if part["type"] == "image":
                image = load_part_image(part, record.get("_dir"), f"message {i}, part {j}", _where(record))
                part = {"type": "image", "image": self._fit(image, record)}
            parts.append(part)
        return {**message, "content": parts}

    def _fit(self, image: Image.Image, record: dict) -> Image.Image:
        """The image, shrunk to fit ``patch_budget`` if it must (policy permitting)."""
        if self.patch_budget is None:
            return image
        cfg = self.chat.image_cfg
        width, height = image.size
        rows, cols = patch_grid(height, width, cfg)
        if rows * cols <= self.patch_budget:
            return image
        too_big = (f"image of {height}x{width} px needs {rows}x{cols}={rows * cols} patches, more than the patch "
                   f"budget {self.patch_budget}")
        if self.oversize_images == "error":
            raise ImageError(f"{_where(record)}: {too_big}")
        if self.oversize_images == "skip":
            raise InvalidRecord(_where(record), "oversize_image", too_big)
        small = dataclasses.replace(cfg, longest_edge=fit_longest_edge(height, width, cfg, self.patch_budget))
        out_h, out_w = resized_size(height, width, small)
        self.downscaled_images += 1
        # Resize exactly as preprocess_image(image, small) would (RGB first, same filter, to a patch
        # multiple), so ChatFormat's own preprocessing then sees a size it keeps unchanged.
        return resize_like_preprocessing(to_rgb(image), (out_h, out_w), cfg)


def _where(record: dict) -> str:
    return str(record.get("_where", "<record>"))
