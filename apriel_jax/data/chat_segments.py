"""The pieces a rendered conversation is made of, shared by the built-in renderer and chat templates.

A conversation is first rendered to segments; ``ChatFormat.render_text`` and ``ChatFormat.encode`` both
read them, so the debug string and the token ids can never describe different conversations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

__all__ = ["Image", "Segment", "Special", "Text", "merge_texts"]


@dataclass(frozen=True)
class Text:
    """Plain text: tokenized as text, so control-token strings in it stay text."""

    text: str
    target: bool
    boundary: bool = False  # True: tokenize on its own, never merged with the previous text


@dataclass(frozen=True)
class Special:
    """A control token, looked up by its string (e.g. ``"<s>"``)."""

    name: str
    target: bool


@dataclass(frozen=True)
class Image:
    """An image of a user turn: its ``[IMG]`` layout is decided by its size when encoding."""

    image: Any
    where: str  # "message 2, image 1": named in errors


Segment = Union[Text, Special, Image]


def merge_texts(segs: list[Segment]) -> list[Segment]:
    """Adjacent texts with the same loss role become one string (one tokenization)."""
    out: list[Segment] = []
    for s in segs:
        prev = out[-1] if out else None
        if isinstance(s, Text) and isinstance(prev, Text) and not s.boundary and prev.target == s.target:
            out[-1] = Text(prev.text + s.text, s.target, prev.boundary)
        else:
            out.append(s)
    return out
