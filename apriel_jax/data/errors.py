"""Errors of the data layer, and the fixed set of reasons a record is refused.

Every refused record is an :class:`InvalidRecord`: its message starts with where the record is
(``file.jsonl:LINE``, ``shard.array_record#record N``, ``file.parquet:row N``), says what is wrong and
ends with the reason in brackets, so one line is enough to find and fix it. The reason is one of
:data:`REASONS`, a small fixed set, so skipped records can be counted per reason (in ``data prepare``'s
manifest, ``data inspect``'s summary and a training run's metrics).
"""

from __future__ import annotations

__all__ = ["DataError", "InvalidRecord", "REASONS"]

REASONS = (
    "invalid_json",  # the line is not JSON
    "bad_schema",  # wrong types or missing fields: not a record the chat format can render
    "empty_text",  # a text record with no text
    "empty_conversation",  # no user or assistant turn
    "no_assistant_turn",  # loss on responses, but no assistant turn: nothing to train on
    "image_count_mismatch",  # <image> placeholders and the record's images differ in number
    "remote_image_url",  # an http(s) image URL: nothing is fetched at training time
    "unreadable_image",  # an image file that cannot be read (missing, permission, storage)
    "bad_image",  # image data that cannot be decoded or used (corrupt, truncated, empty)
    "oversize_image",  # an image over the row's patch budget, with oversize_images="skip"
)


class DataError(ValueError):
    """Input data cannot be used; the message names the file and (1-based) line or record number."""


class InvalidRecord(DataError):
    """One record is malformed: ``"{where}: {detail} [{reason}]"``, ``reason`` one of :data:`REASONS`."""

    def __init__(self, where: str, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}; one of {REASONS}")
        self.where, self.reason, self.detail = where, reason, detail
        super().__init__(f"{where}: {detail} [{reason}]")

    def __reduce__(self):
        # Raised inside grain worker processes and re-raised in the main one: pickle the arguments.
        return type(self), (self.where, self.reason, self.detail)
