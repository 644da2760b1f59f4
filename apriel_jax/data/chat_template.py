"""A checkpoint's own chat template (jinja), rendered the way transformers renders it.

Where a checkpoint carries a template (``chat_template.jinja``, ``chat_template.json`` or the
``chat_template`` of ``tokenizer_config.json``; the first found wins, as in transformers),
:class:`~apriel_jax.data.chat.ChatFormat` renders Apriel conversations with it rather than with its
built-in renderer, so training data and prompts are exactly what the released model saw.

* Text: jinja2's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, loop controls,
  ``raise_exception``, ``strftime_now`` and a ``tojson`` that does not escape HTML: the environment of
  transformers' ``apply_chat_template``, so the rendered text is transformers' text.
* Tokens: the text is cut at the control tokens the template writes (BOS, EOS and the image
  placeholder), as an HF tokenizer cuts at its added tokens, and each piece between them is encoded as
  plain text. Control-token strings inside the caller's strings (messages, tools) are wrapped in
  private-use markers before rendering and come out as text, as transformers'
  ``sanitize_control_tokens=True`` does: user text can never inject a control token.
* Loss targets: an assistant turn's reply is what follows the generation prompt. Rendering the messages
  before it with ``add_generation_prompt=True`` must give the start of the whole rendering; the reply
  runs from there through the first EOS the template writes after it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from .chat_segments import Image, Segment, Special, Text

__all__ = ["ChatTemplate", "ChatTemplateError", "TEMPLATE_FILES"]

# Where a checkpoint keeps its template, in the order transformers prefers them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")

# Private-use characters around a control token that came from the caller's strings. They are removed
# from those strings first, so only the marking below can produce them.
_OPEN, _CLOSE = "\ue000", "\ue001"


class ChatTemplateError(ValueError):
    """A conversation the template cannot render, or a template that cannot be used."""


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes <, > and & for HTML, which a prompt must not get.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"the chat template does not parse: {err}") from err


def _mark(value: Any, controls: re.Pattern) -> Any:
    """``value`` with every control token inside its strings wrapped in the markers (dict keys untouched)."""
    if isinstance(value, str):
        value = value.replace(_OPEN, "").replace(_CLOSE, "")
        return controls.sub(lambda m: _OPEN + m.group(0) + _CLOSE, value)
    if isinstance(value, dict):
        return {k: _mark(v, controls) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, controls) for v in value]
    return value


def _template_in(config: dict) -> str | None:
    """The ``chat_template`` entry of a config: a string, or the "default" of a list of named ones."""
    value = config.get("chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) and value else None


def _token_string(value: Any, default: str) -> str:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default


# Tokenizers already checked against a template source (see ChatTemplate.check_tokenizer).
_CHECKED: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template and the control tokens it writes. Picklable (holds only strings)."""

    source: str
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    image_token: str = "[IMG]"
    origin: str = "chat template"  # where it was read from, named in errors

    @classmethod
    def from_checkpoint(cls, directory) -> ChatTemplate | None:
        """The template of a checkpoint directory (local or ``gs://``), or None when it carries none.

        BOS and EOS strings come from its ``tokenizer_config.json`` when that names them."""
        from apriel_jax import storage  # local: keeps this module light

        def read_json(path) -> dict:
            try:
                return json.loads(storage.read_text(path))
            except json.JSONDecodeError as err:
                raise ChatTemplateError(f"{path}: not valid JSON: {err}") from err

        root = storage.location(directory)
        if not root.is_dir():
            return None
        config_path = root / "tokenizer_config.json"
        config = read_json(config_path) if config_path.exists() else {}
        tokens = {"bos_token": _token_string(config.get("bos_token"), cls.bos_token),
                  "eos_token": _token_string(config.get("eos_token"), cls.eos_token)}
        for name in TEMPLATE_FILES:
            path = root / name
            if not path.exists():
                continue
            source = storage.read_text(path) if name.endswith(".jinja") else _template_in(read_json(path))
            if source:
                return cls(source, origin=os.fspath(path), **tokens)
        return None

    # ---------------------------------------------------------------------------------- text

    @property
    def _controls(self) -> re.Pattern:
        # Longest first, so a token wins over a shorter one it contains.
        tokens = sorted({self.bos_token, self.eos_token, self.image_token}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens)))

    def _render(self, messages: list, tools, add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return _compiled(self.source).render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except (jinja2.TemplateError, TypeError) as err:  # TypeError: e.g. str + int inside the template
            raise ChatTemplateError(f"{self.origin}: {type(err).__name__}: {err}") from err

    def render(self, messages: Sequence[dict], *, tools=None, add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it (messages in the template's own vocabulary)."""
        return self._render(list(messages), tools, add_generation_prompt)

    # ------------------------------------------------------------------------------ segments

    def segments(self, messages: Sequence[dict], images: Sequence[Image], *, tools=None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation as texts, control tokens and images, with assistant replies as targets.

        ``images`` are the image parts of ``messages`` in order; the template writes one image token for each.
        """
        controls = self._controls
        marked, marked_tools = _mark(list(messages), controls), _mark(tools, controls)
        text = self._render(marked, marked_tools, add_generation_prompt)
        # Marked control tokens (text), lone markers (dropped), and the template's own control tokens.
        scan = re.compile(f"{_OPEN}({controls.pattern}){_CLOSE}|[{_OPEN}{_CLOSE}]|({controls.pattern})")
        written = [(m.start(), m.end(), m.group(2)) for m in scan.finditer(text) if m.group(2)]
        replies = self._replies(marked, marked_tools, text, written)
        cuts = sorted({0, len(text), *(p for span in replies for p in span),
                       *(p for start, end, _ in written for p in (start, end))})

        def in_reply(pos: int) -> bool:
            return any(start <= pos < end for start, end in replies)

        segs: list[Segment] = []
        tokens = {start: token for start, _, token in written}
        pending = iter(images)
        for start, end in zip(cuts, cuts[1:]):
            token = tokens.get(start)
            if token == self.image_token:
                image = next(pending, None)
                if image is None:
                    raise ChatTemplateError(f"{self.origin} writes more image tokens than the conversation has images")
                segs.append(image)
            elif token is not None:
                segs.append(Special(token, in_reply(start)))
            else:
                piece = scan.sub(lambda m: m.group(1) or "", text[start:end])  # markers off, marked tokens as text
                if piece:
                    segs.append(Text(piece, in_reply(start)))
        if next(pending, None) is not None:
            raise ChatTemplateError(f"{self.origin} writes fewer image tokens than the conversation has images")
        return segs

    def _replies(self, messages: list, tools, text: str, written: list) -> list[tuple[int, int]]:
        """(start, end) in ``text`` of each assistant turn's reply: after its generation prompt, through EOS."""
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self._render(messages[:i], tools, True)
            if not text.startswith(prompt):
                raise ChatTemplateError(
                    f"message {i}: with {self.origin}, the conversation before this assistant turn plus a generation "
                    "prompt is not how the whole conversation begins, so the reply's start is unknown")
            end = next((e for s, e, token in written if token == self.eos_token and s >= len(prompt)), None)
            if end is None:
                raise ChatTemplateError(f"message {i}: {self.origin} writes no {self.eos_token} after this "
                                        "assistant turn, so the reply's end is unknown")
            spans.append((len(prompt), end))
        return spans

    def check_tokenizer(self, tokenizer) -> None:
        """ChatTemplateError when the template's text holds a control token of ``tokenizer`` other than the
        ones it is cut at: that token would be encoded as plain text, silently."""
        checked = _CHECKED.setdefault(tokenizer, set())
        if self.source in checked:
            return
        expected = {self.bos_token, self.eos_token, self.image_token}
        unknown = sorted(t for t in tokenizer.special_tokens() if t not in expected and t in self.source)
        if unknown:
            raise ChatTemplateError(f"{self.origin} writes control tokens {unknown} that only "
                                    f"{sorted(expected)} are read as; they would be encoded as text")
        checked.add(self.source)
