"""Rows of tabular datasets (Parquet files, TFDS splits) -> our records.

Most public vision-language datasets are tables: a chat or a text column, and the images as encoded
bytes in another column. The mapping (column names configurable, see :class:`Columns`):

* ``messages`` (a list of ``{"role", "content"}`` turns, our/OpenAI chat format; or the same as a JSON
  string) -> ``{"messages": ...}``. Keys whose value is null are dropped from turns and parts: a
  Parquet struct has every key any row uses, so a text part would otherwise carry ``"image": null``.
* ``text`` -> ``{"text": ...}`` (when ``messages`` is absent or null in that row).
* the images column (``images``, else ``image``): one image or a list of them, each raw bytes or a
  ``{"bytes": ..., "path": ...}`` struct (the Hugging Face ``Image`` feature's layout). An image with
  bytes becomes an inline image; one with only a path is read from that path (relative paths resolve
  against the table file's folder).

Where the images go: the chat's image parts that hold no image themselves (``{"type": "image"}``
placeholders) receive the row's images in order, and their numbers must match; a chat with ``<image>``
placeholders in its text gets them as its ``images``, which :mod:`.formats` puts in their places the
same way. A chat with no placeholder gets all the row's images prepended to its first user turn, in
order. A text record cannot carry images: such a row is refused, naming it (set the images column to
``""`` to ignore images).
An optional ``tools`` column (list, or JSON string) is passed through.

A row that cannot become a record is an :class:`~apriel_jax.data.errors.InvalidRecord` (skipped and
counted, or an error, as the run's ``data.on_invalid`` says).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import InvalidRecord
from .formats import IMAGE_REFS, PLACEHOLDER

__all__ = ["Columns", "row_to_record"]

@dataclass(frozen=True)
class Columns:
    """Column names of a table source. ``images=None`` picks ``images`` or ``image``, whichever the table
    has; ``""`` ignores images."""

    text: str = "text"
    messages: str = "messages"
    images: str | None = None
    tools: str = "tools"

    @classmethod
    def from_options(cls, options: dict) -> "Columns":
        """From a source's options ``text_column``, ``messages_column``, ``images_column``."""
        kwargs = {}
        for field in ("text", "messages", "images"):
            if f"{field}_column" in options:
                kwargs[field] = options[f"{field}_column"]
        return cls(**kwargs)

    def image_column(self, names) -> str | None:
        """The images column among the table's column ``names`` (None: no images)."""
        if self.images is not None:
            return self.images or None
        return next((name for name in ("images", "image") if name in names), None)

    def used(self, names) -> list[str]:
        """The columns of ``names`` that the mapping reads (what a columnar reader needs to load)."""
        wanted = {self.text, self.messages, self.tools, self.image_column(names)}
        return [name for name in names if name in wanted]


def row_to_record(row: dict, where: str, columns: Columns, base_dir: str | None = None) -> dict:
    """Our record for one table row (see the module docstring); ``where`` names the row in errors."""
    images = _images(row.get(columns.image_column(row.keys())), where)
    messages, text = row.get(columns.messages), row.get(columns.text)
    if messages is not None:
        if isinstance(messages, (bytes, str)):
            try:
                messages = json.loads(messages)
            except ValueError as err:
                raise InvalidRecord(where, "invalid_json", f"column {columns.messages!r} is not a JSON chat: "
                                    f"{err}") from err
        if not isinstance(messages, list):
            raise InvalidRecord(where, "bad_schema", f"column {columns.messages!r} must be a list of turns, "
                                f"got {type(messages).__name__}")
        record = _with_images(_without_nulls(messages), images, where)
    elif text is not None:
        if images:
            raise InvalidRecord(where, "bad_schema", f"a text record cannot hold images; give the chat in a "
                                f"{columns.messages!r} column, or set the images column to '' to ignore the images")
        record = {"text": text.decode("utf-8") if isinstance(text, bytes) else str(text)}
    else:
        raise InvalidRecord(where, "bad_schema", f"neither {columns.messages!r} nor {columns.text!r} holds a value")
    tools = row.get(columns.tools)
    if isinstance(tools, (bytes, str)):
        try:
            record["tools"] = json.loads(tools)
        except ValueError as err:
            raise InvalidRecord(where, "invalid_json", f"column {columns.tools!r} is not JSON: {err}") from err
    elif tools is not None:
        record["tools"] = _without_nulls(tools)
    record["_where"] = where
    if base_dir is not None:
        record["_dir"] = base_dir
    return record


def _images(value, where: str) -> list[dict]:
    """Image parts for the images column's value: one image or a list; each bytes or a bytes/path struct."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    parts = []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray, memoryview)):
            parts.append({"type": "image", "image": bytes(item)})
        elif isinstance(item, dict) and item.get("bytes") is not None:
            parts.append({"type": "image", "image": bytes(item["bytes"])})
        elif isinstance(item, dict) and item.get("path"):
            parts.append({"type": "image", "path": str(item["path"])})
        else:
            raise InvalidRecord(where, "bad_schema", f"image {i} is neither bytes nor a struct with 'bytes' or "
                                f"'path' (got {type(item).__name__})")
    return parts


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_nulls(v) for v in value]
    return value


def _is_placeholder(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "image" and not any(k in part for k in IMAGE_REFS)


def _has_text_placeholder(messages: list) -> bool:
    for turn in messages:
        content = turn.get("content") if isinstance(turn, dict) else None
        texts = [content] if isinstance(content, str) else [
            p.get("text") for p in (content if isinstance(content, list) else [])
            if isinstance(p, dict) and p.get("type") == "text"]
        if any(isinstance(t, str) and PLACEHOLDER in t for t in texts):
            return True
    return False


def _with_images(messages: list, images: list[dict], where: str) -> dict:
    """The chat record with the row's images in their places (see the module docstring)."""
    slots = [(t, p) for t, turn in enumerate(messages) if isinstance(turn, dict)
             and isinstance(turn.get("content"), list)
             for p, part in enumerate(turn["content"]) if _is_placeholder(part)]
    if slots:
        if len(slots) != len(images):
            raise InvalidRecord(where, "image_count_mismatch", f"the chat has {len(slots)} image placeholders but "
                                f"the row has {len(images)} images")
        for (t, p), image in zip(slots, images):
            messages[t]["content"][p] = {**messages[t]["content"][p], **image}
        return {"messages": messages}
    if _has_text_placeholder(messages):
        return {"messages": messages, "images": images}  # placed by formats.to_native, which checks the count
    if not images:
        return {"messages": messages}
    first_user = next((t for t, turn in enumerate(messages) if isinstance(turn, dict) and turn.get("role") == "user"),
                      None)
    if first_user is None:
        raise InvalidRecord(where, "image_count_mismatch", f"the row has {len(images)} images but the chat has no "
                            "user turn to put them in")
    content = messages[first_user].get("content")
    if content is None:
        content = []
    elif isinstance(content, str):
        content = [{"type": "text", "text": content}]
    messages[first_user] = {**messages[first_user], "content": [*images, *content]}
    return {"messages": messages}
