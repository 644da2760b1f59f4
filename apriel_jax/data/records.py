"""Source records -> :class:`Document`: the ``to_document`` callable the pipeline runs in its workers.

Records come from JSONL / ArrayRecord / TFDS sources (``sources.py``) or synthetic task mixtures:

* ``{"text": str}``: ``<s>`` + text + ``</s>``, every token a target (pre-training style).
* ``{"messages": [...], "tools"?: [...]}``: rendered by :class:`~apriel_jax.data.chat.ChatFormat`.
  Image parts may name their image as ``{"path": "rel/or/abs.png"}`` or ``{"image": "path"}``
  (relative paths resolve against the record's ``_dir``, i.e. its JSONL file's folder), inline
  ``{"image_base64": ...}`` (what ``prepare_array_record`` writes), or an in-memory PIL image / array /
  bytes (synthetic tasks).

Images are decoded here, before chat encoding, so two per-image policies can be applied:

* an image with more patches than ``patch_budget`` (one row's worth) would make its document
  unpackable; ``oversize_images="downscale"`` shrinks it to the largest size that fits (computed from
  ``patch_grid``, so the fit is exact, not approximate), ``"skip"`` drops the record, ``"error"`` raises.
* a corrupt / unreadable image drops the record with a warning naming ``_where`` (file:line) when
  ``on_bad_image="skip"``; ``"error"`` raises :class:`ImageError` with that location instead. A caption
  without its image would teach the model to describe pictures it never saw, so the whole record goes.

A dropped record becomes an empty Document, which the packer counts as dropped and moves past.

The tokenizer is loaded lazily and never pickled: grain pickles this object into each worker process,
and each worker loads its own copy on first use. Counters are per process (a worker's counts stay in
that worker); read them in-process (``worker_count=0``, the CLI, tests) or aggregate them yourself.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from .chat import ChatFormat
from .images import ImageConfig, ImageError, load_image, patch_grid, resize_like_preprocessing, resized_size, to_rgb
from .sources import DataError
from .tokenizer import Tokenizer, load_tokenizer, pixtral_tekken_path
from .types import Document

__all__ = ["RecordToDocument", "fit_longest_edge", "resolve_tokenizer_path"]

log = logging.getLogger(__name__)

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


class _SkipRecord(Exception):
    """Internal: this record is dropped (already counted and logged)."""


class RecordToDocument:
    """Picklable ``record -> Document`` converter; see the module docstring for formats and policies.

    ``tokenizer``: a tokenizer file/directory path or ``"pixtral"``. ``mode``: a ChatFormat mode.
    ``loss``: ``"responses"`` (chat: assistant turns only) or ``"all"``; text records always train on
    every token. ``patch_budget``: patches per packed row (``None``: no per-image limit).
    """

    def __init__(self, tokenizer, mode: str = "apriel", loss: str = "responses",
                 image_cfg: ImageConfig = ImageConfig(), patch_budget: int | None = None,
                 oversize_images: str = "downscale", on_bad_image: str = "skip"):
        if loss not in ("responses", "all"):
            raise ValueError(f"loss must be 'responses' or 'all', got {loss!r}")
        if oversize_images not in ("downscale", "skip", "error"):
            raise ValueError(f"oversize_images must be 'downscale', 'skip' or 'error', got {oversize_images!r}")
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        if patch_budget is not None and patch_budget < 1:
            raise ValueError(f"patch_budget must be >= 1 (or None), got {patch_budget}")
        self.tokenizer_path = resolve_tokenizer_path(tokenizer)
        self.chat = ChatFormat(mode=mode, image_cfg=image_cfg)  # validates mode
        self.loss, self.patch_budget = loss, patch_budget
        self.oversize_images, self.on_bad_image = oversize_images, on_bad_image
        self._tokenizer: Tokenizer | None = None
        self.records = 0  # records converted (including skipped ones)
        self.skipped_records = 0
        self.downscaled_images = 0
        self.bad_images = 0
        self.oversize_skipped = 0

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

    def counters(self) -> dict[str, int]:
        return {"records": self.records, "skipped_records": self.skipped_records,
                "downscaled_images": self.downscaled_images, "bad_images": self.bad_images,
                "oversize_skipped": self.oversize_skipped}

    # ---------------------------------------------------------------------------- conversion

    def __call__(self, record: dict) -> Document:
        self.records += 1
        if "text" in record and "messages" not in record:
            return self._text(record)
        if "messages" not in record:
            raise DataError(f"{_where(record)}: a record must have 'text' or 'messages'")
        try:
            messages = [self._resolve_message(m, record) for m in record["messages"]]
        except _SkipRecord:
            self.skipped_records += 1
            return _empty()
        try:
            return self.chat.encode(messages, self.tokenizer, tools=record.get("tools") or None, loss=self.loss)
        except ImageError as err:  # an image that decoded but is unusable (e.g. zero-size array)
            self._bad_image(record, err)
            self.skipped_records += 1
            return _empty()

    def _text(self, record: dict) -> Document:
        tok = self.tokenizer
        ids = [tok.bos_id, *tok.encode(str(record["text"])), tok.eos_id]
        mask = np.ones(len(ids), np.float32)
        mask[0] = 0.0  # nothing precedes <s>
        return Document(np.asarray(ids, np.int32), mask)

    def _resolve_message(self, message: Any, record: dict) -> Any:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, (list, tuple)):
            return message  # plain string content (or invalid: ChatFormat reports it)
        parts = [self._resolve_part(p, record) if isinstance(p, dict) and p.get("type") == "image" else p
                 for p in content]
        return {**message, "content": parts}

    def _resolve_part(self, part: dict, record: dict) -> dict:
        try:
            image = _load(part, record)
        except ImageError as err:
            self._bad_image(record, err)
            raise _SkipRecord from err
        return {"type": "image", "image": self._fit(image, record)}

    def _bad_image(self, record: dict, err: Exception) -> None:
        self.bad_images += 1
        message = f"{_where(record)}: {err}"
        if self.on_bad_image == "error":
            raise ImageError(message) from err
        log.warning("skipping record with a bad image: %s", message)

    def _fit(self, image: Image.Image, record: dict) -> Image.Image:
        """The image, shrunk to fit ``patch_budget`` if it must (policy permitting)."""
        if self.patch_budget is None:
            return image
        cfg = self.chat.image_cfg
        width, height = image.size
        rows, cols = patch_grid(height, width, cfg)
        if rows * cols <= self.patch_budget:
            return image
        if self.oversize_images == "error":
            raise ImageError(f"{_where(record)}: image of {height}x{width} px needs {rows}x{cols}={rows * cols} patches, "
                                 f"more than the patch budget {self.patch_budget}")
        if self.oversize_images == "skip":
            self.oversize_skipped += 1
            raise _SkipRecord
        small = dataclasses.replace(cfg, longest_edge=fit_longest_edge(height, width, cfg, self.patch_budget))
        out_h, out_w = resized_size(height, width, small)
        self.downscaled_images += 1
        # Resize exactly as preprocess_image(image, small) would (RGB first, same filter, to a patch
        # multiple), so ChatFormat's own preprocessing then sees a size it keeps unchanged.
        return resize_like_preprocessing(to_rgb(image), (out_h, out_w), cfg)


def _where(record: dict) -> str:
    return str(record.get("_where", "<record>"))


def _empty() -> Document:
    return Document(np.zeros(0, np.int32), np.zeros(0, np.float32))


def _load(part: dict, record: dict) -> Image.Image:
    """The decoded image of an image part, from whichever field holds it; ImageError if unusable."""
    if "image_base64" in part:
        try:
            data = base64.b64decode(part["image_base64"], validate=True)
        except (binascii.Error, ValueError, TypeError) as err:
            raise ImageError(f"invalid base64 image data: {err}") from err
        return load_image(data)
    ref = part.get("path", part.get("image"))
    if ref is None:
        raise ImageError("image part has no 'path', 'image' or 'image_base64'")
    if isinstance(ref, (str, os.PathLike)):
        path = os.fspath(ref)
        if not os.path.isabs(path) and record.get("_dir"):
            path = os.path.join(record["_dir"], path)
        return load_image(path)
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return load_image(ref)
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, np.ndarray):
        return to_rgb(ref)  # same validation preprocess_image applies to arrays
    raise ImageError(f"image must be a path, bytes, base64, PIL image or array, got {type(ref).__name__}")
