"""The one record validator of ``data prepare``, ``data inspect`` and training, and what happens to a bad record.

:func:`check_record` converts a record from the formats users bring (:mod:`.formats`) and checks every
field the chat format reads, so that a malformed record is an :class:`InvalidRecord` naming where it is
and why (one of :data:`REASONS`), never a TypeError or KeyError deep inside tokenization:

* text records: ``text`` a non-empty string;
* chats: ``messages`` a list of objects; ``role`` one of system/user/assistant/tool, system turns first;
  ``content`` a string, null or a list of parts; a text part's ``text`` a string; an image part (user
  turns only) naming its image exactly once, by a string ``path``, a ``image`` (path, bytes or an
  in-memory image) or a string ``image_base64``; ``reasoning`` a string; ``tool_calls`` a list of calls
  with a name and object (or JSON string) arguments, on assistant turns; ``tools`` a list of objects;
* at least one user or assistant turn (``empty_conversation``), and, when the loss is on responses, an
  assistant turn (``no_assistant_turn``: such a record would train on nothing).

Image data is not read here (that is :mod:`.image_refs`' job, where the training converter or
``data prepare`` needs it).

What happens to a record that fails (:data:`ON_INVALID`): ``"skip"`` turns it into an empty
:class:`Document` that carries the reason (the pipeline counts it per reason, the packer moves past it),
and logs the first few of each reason; ``"error"`` raises the one-line error.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from .errors import REASONS, InvalidRecord
from .formats import IMAGE_REFS, describe, to_native
from .types import Document

__all__ = ["ON_INVALID", "SkipLog", "check_image_part", "check_on_invalid", "check_record", "convert_or_skip",
           "describe_skips"]

log = logging.getLogger(__name__)

ON_INVALID = ("skip", "error")
ROLES = ("system", "user", "assistant", "tool")
_IMAGE_VALUES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)


def check_on_invalid(value: str) -> str:
    if value not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {value!r}")
    return value


def check_record(record: Any, *, loss: str | None = None, mode: str = "apriel") -> dict:
    """``record`` in native form (:func:`~apriel_jax.data.formats.to_native`), checked (see the module
    docstring). ``loss="responses"`` also requires an assistant turn; ``mode="mistral_instruct"`` refuses
    what that format cannot render (tools, reasoning). Raises :class:`InvalidRecord`."""
    if not isinstance(record, dict):
        raise InvalidRecord("<record>", "bad_schema", f"a record must be an object, got {describe(record)}")
    where = str(record.get("_where", "<record>"))
    record = to_native(record)
    if "messages" in record:
        _check_chat(record, where, loss, mode)
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise InvalidRecord(where, "bad_schema", f"'text' must be a string, got {describe(text)}")
        if not text.strip():
            raise InvalidRecord(where, "empty_text", "the text is empty")
    else:
        raise InvalidRecord(where, "bad_schema", "a record needs 'text', 'messages' or 'conversations'")
    return record


def _check_chat(record: dict, where: str, loss: str | None, mode: str) -> None:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise InvalidRecord(where, "bad_schema", f"'messages' must be a list of turns, got {describe(messages)}")
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise InvalidRecord(where, "bad_schema", f"'tools' must be a list of objects, got {describe(tools)}")
    roles: set[str] = set()
    for i, message in enumerate(messages):
        what = f"message {i}"
        if not isinstance(message, dict):
            raise InvalidRecord(where, "bad_schema", f"{what} must be an object with 'role' and 'content', got "
                                f"{describe(message)}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRecord(where, "bad_schema", f"{what}: 'role' must be one of {', '.join(ROLES)}, got "
                                f"{describe(role)}")
        if role == "system" and roles - {"system"}:
            raise InvalidRecord(where, "bad_schema", f"{what}: system messages must come before all others")
        roles.add(role)
        _check_content(message.get("content"), role, what, where)
        reasoning, calls = message.get("reasoning"), message.get("tool_calls")
        if reasoning is not None and not isinstance(reasoning, str):
            raise InvalidRecord(where, "bad_schema", f"{what}: 'reasoning' must be a string, got {describe(reasoning)}")
        if (reasoning is not None or calls) and role != "assistant":
            raise InvalidRecord(where, "bad_schema", f"{what}: only assistant turns have 'reasoning' or 'tool_calls'")
        if calls is not None:
            _check_tool_calls(calls, what, where)
        if mode == "mistral_instruct" and (role == "tool" or calls or reasoning is not None):
            raise InvalidRecord(where, "bad_schema", f"{what}: the mistral_instruct format has no tools or reasoning")
    if mode == "mistral_instruct" and tools:
        raise InvalidRecord(where, "bad_schema", "the mistral_instruct format renders no tools")
    if not roles & {"user", "assistant"}:
        raise InvalidRecord(where, "empty_conversation", f"the conversation has no user or assistant turn "
                            f"({len(messages)} messages)")
    if loss == "responses" and "assistant" not in roles:
        raise InvalidRecord(where, "no_assistant_turn", "the conversation has no assistant turn: with the loss on "
                            "responses it would train on nothing")


def _check_content(content: Any, role: str, what: str, where: str) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRecord(where, "bad_schema", f"{what}: 'content' must be a string or a list of parts, got "
                            f"{describe(content)}")
    for j, part in enumerate(content):
        at = f"{what}, part {j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                got = f"got {describe(part['text'])}" if "text" in part else "it has none"
                raise InvalidRecord(where, "bad_schema", f"{at}: a text part needs a string 'text', {got}")
        elif kind == "image":
            if role != "user":
                raise InvalidRecord(where, "bad_schema", f"{at}: images are only supported in user turns, not {role}")
            check_image_part(part, at, where)
        else:
            raise InvalidRecord(where, "bad_schema", f"{at} must be {{'type': 'text' | 'image' | 'image_url', ...}}, "
                                f"got {describe(part)}")


def check_image_part(part: dict, what: str, where: str) -> tuple[str, Any]:
    """(field, value) of the one reference an image part names its image by; InvalidRecord if there is none,
    more than one, or one of the wrong type."""
    refs = [k for k in IMAGE_REFS if part.get(k) is not None]
    if not refs:
        raise InvalidRecord(where, "bad_schema", f"{what}: an image part needs 'path', 'image' or 'image_base64'")
    if len(refs) > 1:
        raise InvalidRecord(where, "bad_schema", f"{what}: an image part names its image once, got {refs}")
    key = refs[0]
    value = part[key]
    allowed = {"path": (str, os.PathLike), "image_base64": (str,), "image": _IMAGE_VALUES}[key]
    if not isinstance(value, allowed):
        kind = "a string" if key != "image" else "a path, bytes, a PIL image or an array"
        raise InvalidRecord(where, "bad_schema", f"{what}: image '{key}' must be {kind}, got {type(value).__name__}")
    if isinstance(value, str) and key != "image_base64" and value[:8].lower().startswith(("http://", "https://")):
        raise InvalidRecord(where, "remote_image_url", f"{what}: image '{key}' is a remote URL ({value[:100]}): "
                            "nothing is fetched at training time; download the images and name their files")
    return key, value


def _check_tool_calls(calls: Any, what: str, where: str) -> None:
    if not isinstance(calls, list):
        raise InvalidRecord(where, "bad_schema", f"{what}: 'tool_calls' must be a list, got {describe(calls)}")
    for k, call in enumerate(calls):
        at = f"{what}, tool call {k}"
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRecord(where, "bad_schema", f"{at} needs a 'name' (ours: {{'name', 'arguments'}}; OpenAI's: "
                                f"{{'function': {{'name', 'arguments'}}}}), got {describe(call)}")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                json.loads(arguments)
            except json.JSONDecodeError as err:
                raise InvalidRecord(where, "bad_schema", f"{at} ({fn['name']}): 'arguments' is not valid JSON: "
                                    f"{err}") from err
        elif not isinstance(arguments, dict):
            raise InvalidRecord(where, "bad_schema", f"{at} ({fn['name']}): 'arguments' must be an object or a JSON "
                                f"string, got {describe(arguments)}")


# ------------------------------------------------------------------------------------------ skipping


class SkipLog:
    """Records skipped in this process, per reason. The first ``log_first`` of each reason are logged as
    warnings (their one-line message), the rest only counted: a dataset with a systematic problem
    must not bury the log."""

    def __init__(self, log_first: int = 3):
        self.log_first = log_first
        self.counts = dict.fromkeys(REASONS, 0)

    def add(self, err: InvalidRecord) -> None:
        n = self.counts[err.reason] = self.counts[err.reason] + 1
        if n <= self.log_first:
            more = f" (further '{err.reason}' records are counted, not logged)" if n == self.log_first else ""
            log.warning("skipped %s%s", err, more)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def describe_skips(counts: Mapping[str, int]) -> str:
    """``"bad_schema 2, unreadable_image 1"`` (reasons with a count, in :data:`REASONS` order), or ``"none"``."""
    text = ", ".join(f"{reason} {counts[reason]}" for reason in REASONS if counts.get(reason))
    return text or "none"


def convert_or_skip(convert: Callable[[], Document], on_invalid: str, skips: SkipLog) -> Document:
    """``convert()``, or, when it raises :class:`InvalidRecord` and ``on_invalid == "skip"``, an empty
    Document carrying the reason (counted and logged in ``skips``)."""
    try:
        return convert()
    except InvalidRecord as err:
        if on_invalid == "error":
            raise
        skips.add(err)
        return Document.skipped(err.reason)
