"""The image an image part names: its bytes (what ``data prepare`` embeds) or the decoded image (training).

An image part (checked by :func:`apriel_jax.data.validate.check_image_part`) names its image once: a
``path`` or ``image`` path (local, relative to the record's file, or ``gs://``), inline ``image_base64``,
or, in records built in memory, ``image`` bytes, a PIL image or an array.

Failures are :class:`~apriel_jax.data.errors.InvalidRecord` errors naming the record: ``unreadable_image``
for a file that cannot be read (missing, not a file, no permission), ``bad_image`` for data that cannot
be decoded. A :class:`~apriel_jax.storage.StorageError` (credentials, a missing bucket, a storage service
that keeps failing) is not a fault of the record and propagates as it is.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os

import numpy as np
from PIL import Image

from apriel_jax import storage

from .errors import InvalidRecord
from .files import join_relative
from .images import ImageError, load_image, to_rgb
from .validate import check_image_part

__all__ = ["bad_image", "load_part_image", "read_part_bytes"]


def _reference(part: dict, base_dir, what: str, where: str):
    """(name for messages, bytes or location string or in-memory image) of the part's image."""
    key, value = check_image_part(part, what, where)
    if key == "image_base64":
        try:
            return "inline base64", base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise InvalidRecord(where, "bad_image", f"{what}: invalid base64 image data: {err}") from err
    if isinstance(value, (str, os.PathLike)):
        location = join_relative(base_dir, value)
        return location, location
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes", bytes(value)
    return type(value).__name__, value


def _read(location: str, what: str, where: str) -> bytes:
    try:
        if storage.is_remote(location):
            return storage.read_bytes(location)
        with open(location, "rb") as f:
            return f.read()
    except storage.StorageError:
        raise
    except OSError as err:
        raise InvalidRecord(where, "unreadable_image", f"cannot read image {location} ({what}): "
                            f"{err.strerror or err}") from err


def read_part_bytes(part: dict, base_dir, what: str, where: str) -> bytes:
    """The encoded bytes of the part's image (a file's content, or the inline data), undecoded."""
    name, ref = _reference(part, base_dir, what, where)
    if isinstance(ref, bytes):
        return ref
    if isinstance(ref, str):
        return _read(ref, what, where)
    raise InvalidRecord(where, "bad_schema", f"{what}: an in-memory {name} has no file bytes to store")


def load_part_image(part: dict, base_dir, what: str, where: str) -> Image.Image:
    """The part's image, decoded fully (and, for an array, converted as preprocessing would)."""
    name, ref = _reference(part, base_dir, what, where)
    with bad_image(what, name, where):
        if isinstance(ref, str):
            return load_image(_read(ref, what, where))
        if isinstance(ref, bytes):
            return load_image(ref)
        if isinstance(ref, np.ndarray):
            return to_rgb(ref)
        return ref


@contextlib.contextmanager
def bad_image(what: str, name: str, where: str):
    """ImageErrors inside the block become ``bad_image`` InvalidRecords naming the record and the image."""
    try:
        yield
    except ImageError as err:
        raise InvalidRecord(where, "bad_image", f"{what} ({name}): {err}") from err
