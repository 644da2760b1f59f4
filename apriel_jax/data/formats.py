"""Chat records in the formats people already have -> our native ``{"messages": [...]}`` records.

Converted (by :func:`to_native`, which every record goes through before validation):

* **LLaVA / ShareGPT**: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...],
  "image": str | "images": [...]}``. Speakers ``human``/``user`` become ``user``, ``gpt``/``assistant``
  become ``assistant``, ``system`` stays; turns written ``{"role", "content"}`` are taken as they are.
* **OpenAI chat**: content parts ``{"type": "image_url", "image_url": {"url": URL}}`` (or
  ``"image_url": URL``) become image parts; ``{"type": "text", "text": ...}`` parts are native already.
  Image parts written the Hugging Face way, ``{"type": "image", "url": URL}``, are converted the same way.
* **Placeholders**: ``<image>`` in a turn's text (string content or text parts), and image parts that
  name no image (``{"type": "image"}``), take the record's ``images`` (or ``image``) in order. Their
  numbers must be equal (else ``image_count_mismatch``): an image is never dropped, nor a placeholder
  left in the text.

Image references (entries of ``images``, image URLs): a path (relative to the record's file, absolute or
``gs://``), a ``file://`` URL, a ``data:image/...;base64,...`` URL, bytes, or a ``{"bytes"|"path"|"url":
...}`` object (the Hugging Face ``Image`` layout). ``http(s)://`` URLs are refused (``remote_image_url``):
nothing is fetched at training time.

Converted exactly: the text is kept byte for byte, except that a single newline that only separates a
placeholder from the text next to it is dropped (LLaVA writes ``"<image>\\nQuestion"``; the image is its
own block in our layout). Text without placeholders keeps its form (a string stays a string), so a
converted record renders exactly like the native record one would write by hand (tested).

Malformed input is either reported here (``InvalidRecord``, for what only this module understands) or
passed through unchanged for :mod:`.validate` to report.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from .errors import InvalidRecord

__all__ = ["IMAGE_REFS", "PLACEHOLDER", "RECORD_KEYS", "describe", "image_part", "to_native"]

RECORD_KEYS = ("text", "messages", "conversations")  # a record has one of these
PLACEHOLDER = "<image>"
_SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_IMAGE_KEYS = ("images", "image")  # record-level lists of images (LLaVA: "image", most others: "images")
IMAGE_REFS = ("path", "image", "image_base64")  # what a native image part names its image by


def to_native(record: dict) -> dict:
    """``record`` in the native form (a new dict if anything changed; see the module docstring)."""
    where = str(record.get("_where", "<record>"))
    if "conversations" in record:
        if "messages" in record:
            raise InvalidRecord(where, "bad_schema", "a record has 'messages' or 'conversations', not both")
        turns = record["conversations"]
        record = {k: v for k, v in record.items() if k != "conversations"}
        record["messages"] = _sharegpt(turns, where)
    images = _record_images(record, where)
    if "messages" not in record:
        if images:
            raise InvalidRecord(where, "bad_schema", "a text record cannot hold images; give a chat ('messages' "
                                "or 'conversations') with '<image>' placeholders")
        return record
    messages = record["messages"]
    if not isinstance(messages, list):
        return record  # the validator says what is wrong
    record = {k: v for k, v in record.items() if k not in _IMAGE_KEYS}
    slots: list[dict] = []  # placeholder parts, in order; they receive the record's images
    record["messages"] = [_message(m, i, slots, where) for i, m in enumerate(messages)]
    images = images or []
    if len(slots) != len(images):
        raise InvalidRecord(where, "image_count_mismatch",
                            f"the chat has {len(slots)} image placeholders ('{PLACEHOLDER}' or image parts naming no "
                            f"image) but the record has {len(images)} images")
    for k, (slot, entry) in enumerate(zip(slots, images)):
        slot.update(image_part(entry, where, f"image {k}"))
    return record


def image_part(entry: Any, where: str, what: str) -> dict:
    """A native image part for one image reference (see the module docstring); ``what`` names it in errors."""
    if isinstance(entry, str):
        return _from_url(entry, where, what)
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return {"type": "image", "image": bytes(entry)}
    if isinstance(entry, dict):
        # Hugging Face's Image layout may hold both the bytes and the name of the original file: bytes first.
        if isinstance(entry.get("bytes"), (bytes, bytearray, memoryview)):
            return {"type": "image", "image": bytes(entry["bytes"])}
        refs = {k: entry[k] for k in IMAGE_REFS if entry.get(k) is not None}
        if refs:
            return {"type": "image", **refs}
        if isinstance(entry.get("url"), str):
            return _from_url(entry["url"], where, what)
    raise InvalidRecord(where, "bad_schema", f"{what} must be a path, a URL, bytes or an object with 'path', "
                        f"'bytes' or 'url', got {describe(entry)}")


def _from_url(url: str, where: str, what: str) -> dict:
    if url[:8].lower().startswith(("http://", "https://")):
        raise InvalidRecord(where, "remote_image_url", f"{what} is a remote URL ({url[:100]}): nothing is fetched at "
                            "training time; download the images and name their files")
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRecord(where, "bad_image", f"{what}: a data: URL must hold base64 (data:image/...;base64,...)")
        return {"type": "image", "image_base64": payload}
    if url.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidRecord(where, "unreadable_image", f"{what}: {url[:100]} names another host")
        return {"type": "image", "path": urllib.parse.unquote(parsed.path)}
    return {"type": "image", "path": url}


def _record_images(record: dict, where: str) -> list | None:
    """The record-level images (``images`` or ``image``), as a list; None when the record has none."""
    present = [k for k in _IMAGE_KEYS if record.get(k) is not None]
    if len(present) > 1:
        raise InvalidRecord(where, "bad_schema", "a record has 'images' or 'image', not both")
    if not present:
        return None
    value = record[present[0]]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _sharegpt(turns: Any, where: str) -> list:
    if not isinstance(turns, list):
        raise InvalidRecord(where, "bad_schema", f"'conversations' must be a list of turns, got {describe(turns)}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not ("from" in turn or "value" in turn):
            out.append(turn)  # not ShareGPT-style: the validator checks it as a message
            continue
        speaker = turn.get("from")
        role = _SPEAKERS.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise InvalidRecord(where, "bad_schema", f"conversations[{i}]: 'from' must be one of "
                                f"{sorted(_SPEAKERS)}, got {describe(speaker)}")
        if "value" not in turn:
            raise InvalidRecord(where, "bad_schema", f"conversations[{i}] has no 'value'")
        out.append({"role": role, "content": turn["value"]})
    return out


def _message(message: Any, i: int, slots: list[dict], where: str) -> Any:
    """The message with image URLs converted and placeholders split out (registered in ``slots``)."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": _split(content, slots)} if PLACEHOLDER in content else message
    if not isinstance(content, list):
        return message
    parts: list = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str) and PLACEHOLDER in part["text"]:
            parts += _split(part["text"], slots)
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise InvalidRecord(where, "bad_schema", f"message {i}, part {j}: an image_url part needs "
                                    f"{{'image_url': {{'url': str}}}}, got {describe(part.get('image_url'))}")
            parts.append(_from_url(url, where, f"message {i}, part {j}"))
        elif kind == "image" and not any(k in part for k in IMAGE_REFS):
            if "url" in part:
                parts.append(image_part({"url": part["url"]}, where, f"message {i}, part {j}"))
            else:
                slot = dict(part)
                slots.append(slot)
                parts.append(slot)
        else:
            parts.append(part)
    return {**message, "content": parts}


def _split(text: str, slots: list[dict]) -> list[dict]:
    """Text parts and placeholder image parts of a text with ``<image>`` placeholders."""
    pieces = text.split(PLACEHOLDER)
    out: list[dict] = []
    for k, piece in enumerate(pieces):
        if k:
            slot = {"type": "image"}
            slots.append(slot)
            out.append(slot)
            piece = piece[1:] if piece.startswith("\n") else piece
        if k < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def describe(value: Any) -> str:
    """``value`` for an error message: its repr (cut short) and type."""
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"
