"""Chat conversations (text, images, tools) -> one training :class:`Document`, and model output -> parts.

Formats (``ChatFormat.mode``):

* ``"apriel"``: Apriel-1.5-Thinker's template. Role tags are *plain text* (``<|user|>`` etc. are
  tokenized like any other text)::

      <s><|system|>\\n{SYSTEM}\\n<|end|>\\n<|user|>\\n{user}\\n<|end|>\\n<|assistant|>\\n
      Here are my reasoning steps:\\n{thoughts}\\n[BEGIN FINAL RESPONSE]\\n{answer}\\n[END FINAL RESPONSE]
      \\n<|end|>\\n</s>

  SYSTEM is the default system prompt, then (``\\n\\n``-separated) the conversation's own system
  messages, then the tools block. The default is never replaced, only extended.
* ``"think"`` / ``"nothink"`` (Phi-4-reasoning-vision mode tags, so one model can do both): the
  assistant body is ``<think>{thoughts}</think>\\n[BEGIN FINAL RESPONSE]\\n{answer}\\n[END FINAL RESPONSE]``
  or ``<nothink>{answer}``; everything else as in ``"apriel"`` (the reasoning prefix is not used).
  Their generation prompt ends with the mode tag, so the caller's choice of mode decides the output.
* ``"mistral_instruct"``: Pixtral-12B's own ``[INST]…[/INST]`` layout, token for token what
  mistral-common's v3 tekken instruct encoder produces (tests compare the two). Mirrored details:
  system messages are joined by ``\\n\\n`` and prepended to the *last* user turn; adjacent text parts
  are joined by ``\\n\\n``; each text part / image is tokenized on its own; a user turn of texts
  followed by a single image gets the image moved first; assistant text is right-stripped of spaces.
  No default system prompt, no tools, no reasoning (ValueError).

Messages are OpenAI/HF-like dicts: ``{"role": "system"|"user"|"assistant"|"tool", "content": str |
[{"type": "text", "text": ...} | {"type": "image", "image": PIL image | array | path | bytes}],
"reasoning": str (assistant thoughts), "tool_calls": [{"name", "arguments", "id"?}]}``. Tool calls in
OpenAI's nested ``{"function": {...}}`` form and JSON-string arguments are accepted too.

Special tokens (``<s>``, ``</s>``, ``[INST]``, the image layout) are placed by code with ids looked up
by string; text goes through ``tokenizer.encode`` as plain text, so user text can never inject them.
Adjacent text pieces with the same loss role are tokenized as one string (as a template + processor
would), except in ``mistral_instruct`` mode, which tokenizes piece by piece as mistral-common does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from .images import ImageConfig, ImageError, image_token_layout, load_image, patchify, preprocess_image
from .tokenizer import Tokenizer
from .types import Document, ImagePatches

__all__ = ["ChatFormat", "DEFAULT_SYSTEM_PROMPT", "ParsedResponse", "parse_response", "render_text"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a thoughtful and systematic AI assistant built by ServiceNow Language Models (SLAM) lab. "
    "Before providing an answer, analyze the problem carefully and present your reasoning step by step. "
    "After explaining your thought process, provide the final solution in the following format: "
    "[BEGIN FINAL RESPONSE] ... [END FINAL RESPONSE]."
)
REASONING_PREFIX = "Here are my reasoning steps:\n"
BEGIN_FINAL, END_FINAL = "[BEGIN FINAL RESPONSE]", "[END FINAL RESPONSE]"
END_TAG = "<|end|>"
THINK_OPEN, THINK_CLOSE, NOTHINK = "<think>", "</think>", "<nothink>"
TOOL_CALLS_OPEN, TOOL_CALLS_CLOSE = "<tool_calls>", "</tool_calls>"
TOOLS_INTRO = (
    "You are provided with function signatures within <available_tools></available_tools> XML tags. "
    "You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available tools:\n"
)
TOOLS_OUTRO = (
    "Return all function calls as a list of JSON objects within <tool_calls></tool_calls> XML tags. "
    "Each JSON object should have a name and arguments field:\n"
    '<tool_calls>[{"name": <function-name>, "arguments": <args-dict>}, ...]</tool_calls>'
)
MODES = ("apriel", "think", "nothink", "mistral_instruct")
_ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]


# --------------------------------------------------------------------------------------- segments
# A conversation is first rendered to segments; ``render_text`` and ``encode`` both read them, so the
# debug string and the token ids can never describe different conversations.


@dataclass(frozen=True)
class _Text:
    text: str
    target: bool
    boundary: bool = False  # True: tokenize on its own, never merged with the previous text


@dataclass(frozen=True)
class _Special:
    name: str  # token string, e.g. "<s>"
    target: bool


@dataclass(frozen=True)
class _Image:
    image: Any
    where: str  # "message 2, image 1": named in errors


_Segment = Union[_Text, _Special, _Image]


def _parts(message: Message, where: str, allow_images: bool) -> list[Union[str, _Image]]:
    """The message content as strings and images, in order."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"{where}: content must be a str or a list of parts, got {type(content).__name__}")
    out: list[Union[str, _Image]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(str(part["text"]))
        elif kind == "image":
            if not allow_images:
                raise ValueError(f"{where}: images are only supported in user messages")
            n = sum(isinstance(p, _Image) for p in out)
            out.append(_Image(part["image"], f"{where}, image {n}"))
        else:
            raise ValueError(f"{where}: part {j} must be {{'type': 'text'|'image', ...}}, got {part!r}")
    return out


def _text_of(message: Message, where: str) -> str:
    return "".join(_parts(message, where, allow_images=False))


def _normalise_call(call: dict, where: str) -> dict:
    """``{"name", "arguments", "id"?}`` from our form or OpenAI's ``{"function": {...}, "id"}``."""
    fn = call.get("function", call)
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: tool call {fn.get('name')!r} has invalid JSON arguments: {err}") from err
    out = {"name": fn["name"], "arguments": arguments}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def _tool_calls_text(calls: Sequence[dict], where: str) -> str:
    body = json.dumps([_normalise_call(c, where) for c in calls], ensure_ascii=False)
    return TOOL_CALLS_OPEN + body + TOOL_CALLS_CLOSE


def _tools_block(tools: Sequence[dict]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return TOOLS_INTRO + "<available_tools>\n" + listing + "\n</available_tools>\n\n" + TOOLS_OUTRO


def _split_system(messages: Sequence[Message]) -> tuple[list[str], list[tuple[int, Message]]]:
    """Leading system messages' texts and the remaining (index, message) pairs, validated."""
    systems, rest = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ValueError(f"message {i}: role must be one of {_ROLES}, got {m!r:.80}")
        if m["role"] == "system":
            if rest:
                raise ValueError(f"message {i}: system messages must come before all others")
            systems.append(_text_of(m, f"message {i}"))
        else:
            rest.append((i, m))
    return systems, rest


# ------------------------------------------------------------------------------------------ format


@dataclass(frozen=True)
class ChatFormat:
    """How conversations become documents; see the module docstring for the layouts."""

    mode: str = "apriel"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Apriel only: put "Here are my reasoning steps:\n" in the assistant header (a prompt, never a
    # target) for both training and generation; False makes it the first target text of the response.
    add_reasoning_prefix: bool = True
    image_cfg: ImageConfig = field(default_factory=ImageConfig)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    # ---------------------------------------------------------------- apriel / think / nothink

    def _assistant_header(self) -> str:
        header = "<|assistant|>\n"
        if self.mode == "apriel" and self.add_reasoning_prefix:
            header += REASONING_PREFIX
        return header

    def _assistant_body(self, m: Message, where: str) -> str:
        answer, reasoning, calls = _text_of(m, where), m.get("reasoning"), m.get("tool_calls") or []
        final = f"{BEGIN_FINAL}\n{answer}\n{END_FINAL}"
        if self.mode == "nothink":
            body = NOTHINK + answer
        elif self.mode == "think":
            body = f"{THINK_OPEN}{reasoning or ''}{THINK_CLOSE}\n{final}"
        else:
            body = "" if self.add_reasoning_prefix else REASONING_PREFIX
            if reasoning is not None:
                body += reasoning + "\n"
            # A pure tool-call turn needs no empty final-response block.
            if answer or not calls or reasoning is not None:
                body += final
        if calls:
            body += ("\n" if body else "") + _tool_calls_text(calls, where)
        return body

    def _apriel_segments(self, messages, tools, add_generation_prompt) -> list[_Segment]:
        systems, rest = _split_system(messages)
        system = "\n\n".join(s for s in [self.system_prompt, *systems] if s)
        if tools:
            system = (system + "\n\n" if system else "") + _tools_block(tools)
        segs: list[_Segment] = [_Special("<s>", False)]
        if system:
            segs.append(_Text(f"<|system|>\n{system}\n{END_TAG}\n", False))
        for i, m in rest:
            where = f"message {i}"
            if m["role"] == "user":
                segs.append(_Text("<|user|>\n", False))
                segs += [p if isinstance(p, _Image) else _Text(p, False) for p in _parts(m, where, True)]
                segs.append(_Text(f"\n{END_TAG}\n", False))
            elif m["role"] == "tool":
                segs.append(_Text(f"<|tool_result|>\n{_text_of(m, where)}\n{END_TAG}\n", False))
            else:
                segs.append(_Text(self._assistant_header(), False))
                segs.append(_Text(self._assistant_body(m, where) + f"\n{END_TAG}\n", True))
                segs.append(_Special("</s>", True))
        if add_generation_prompt:
            tag = {"think": THINK_OPEN, "nothink": NOTHINK}.get(self.mode, "")
            segs.append(_Text(self._assistant_header() + tag, False))
        return segs

    # ---------------------------------------------------------------------------- mistral

    def _mistral_segments(self, messages, tools) -> list[_Segment]:
        if tools:
            raise ValueError("mode 'mistral_instruct' does not render tools")
        systems, rest = _split_system(messages)
        system = "\n\n".join(systems)
        last_user = max((i for i, m in rest if m["role"] == "user"), default=-1)
        segs: list[_Segment] = [_Special("<s>", False)]
        for i, m in rest:
            where = f"message {i}"
            if m["role"] == "tool" or m.get("tool_calls") or m.get("reasoning") is not None:
                raise ValueError(f"{where}: mode 'mistral_instruct' supports no tools or reasoning")
            if m["role"] == "assistant":
                segs.append(_Text(_text_of(m, where).rstrip(" "), True, boundary=True))
                segs.append(_Special("</s>", True))
                continue
            prefix = system + "\n\n" if (i == last_user and system) else ""
            segs.append(_Special("[INST]", False))
            if isinstance(m.get("content"), str):  # one string: encoded in one piece with the system text
                segs.append(_Text(prefix + m["content"], False, boundary=True))
            else:
                if prefix:
                    segs.append(_Text(prefix, False, boundary=True))
                segs += _mistral_chunks(_parts(m, where, True))
            segs.append(_Special("[/INST]", False))
        return segs

    # ------------------------------------------------------------------------------ public

    def segments(self, messages: Sequence[Message], *, tools=None, add_generation_prompt=False) -> list[_Segment]:
        if self.mode == "mistral_instruct":
            return self._mistral_segments(messages, tools)  # its prompt already ends at [/INST]
        return self._apriel_segments(messages, tools, add_generation_prompt)

    def render_text(self, messages: Sequence[Message], *, tools=None, add_generation_prompt=False) -> str:
        """The conversation as one string, one ``[IMG]`` per image (for reading, not for tokenizing)."""
        out = []
        for s in self.segments(messages, tools=tools, add_generation_prompt=add_generation_prompt):
            out.append(s.text if isinstance(s, _Text) else s.name if isinstance(s, _Special) else "[IMG]")
        return "".join(out)

    def encode(self, messages: Sequence[Message], tokenizer: Tokenizer, *, tools=None, loss: str = "responses",
               add_generation_prompt: bool = False, source: str = "") -> Document:
        """Tokens, loss mask and image patches of a conversation.

        ``loss="responses"``: only assistant turns are targets (body, closing ``\\n<|end|>\\n`` and
        ``</s>``). ``loss="all"``: every token is. In both, the first token and all image layout
        tokens (``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``) are never targets: nothing precedes the
        first token, and the layout is fixed by the image size, so predicting it teaches nothing.
        """
        if loss not in ("responses", "all"):
            raise ValueError(f"loss must be 'responses' or 'all', got {loss!r}")
        tokens: list[int] = []
        mask: list[float] = []
        images: list[ImagePatches] = []
        p = self.image_cfg.patch_size
        for seg in _merge(self.segments(messages, tools=tools, add_generation_prompt=add_generation_prompt)):
            if isinstance(seg, _Image):
                pixels = _preprocess(seg, self.image_cfg)
                patches, positions = patchify(pixels, p)
                images.append(ImagePatches(patches, positions))
                ids = image_token_layout(pixels.shape[0] // p, pixels.shape[1] // p, tokenizer.image_id,
                                         tokenizer.image_break_id, tokenizer.image_end_id)
                tokens += ids
                mask += [0.0] * len(ids)
                continue
            ids = tokenizer.encode(seg.text) if isinstance(seg, _Text) else [tokenizer.special_id(seg.name)]
            tokens += ids
            mask += [1.0 if (seg.target or loss == "all") else 0.0] * len(ids)
        if mask:
            mask[0] = 0.0
        return Document(np.asarray(tokens, np.int32), np.asarray(mask, np.float32), images, source)


def _mistral_chunks(parts: list) -> list[_Segment]:
    """mistral-common's normalisation of a user turn: adjacent texts joined by blank lines, and a
    turn of only texts followed by one image gets the image first."""
    merged: list = []
    for p in parts:
        if isinstance(p, str) and merged and isinstance(merged[-1], str):
            merged[-1] += "\n\n" + p
        else:
            merged.append(p)
    if len(merged) >= 2 and isinstance(merged[-1], _Image) and all(isinstance(p, str) for p in merged[:-1]):
        merged = [merged[-1], *merged[:-1]]
    return [p if isinstance(p, _Image) else _Text(p, False, boundary=True) for p in merged]


def _merge(segs: list[_Segment]) -> list[_Segment]:
    """Adjacent texts with the same loss role become one string (one tokenization)."""
    out: list[_Segment] = []
    for s in segs:
        prev = out[-1] if out else None
        if (isinstance(s, _Text) and isinstance(prev, _Text) and not s.boundary and prev.target == s.target):
            out[-1] = _Text(prev.text + s.text, s.target, prev.boundary)
        else:
            out.append(s)
    return out


def _load(seg: _Image):
    """A decodable image for ``preprocess_image``; failures raise ImageError naming the message."""
    img = seg.image
    try:
        if isinstance(img, (str, os.PathLike, bytes, bytearray, memoryview)):
            return load_image(img)
    except ImageError as err:
        raise ImageError(f"{seg.where}: {err}") from err
    if isinstance(img, (Image.Image, np.ndarray)):
        return img
    raise ImageError(f"{seg.where}: expected a PIL image, array, path or bytes, got {type(img).__name__}")


def _preprocess(seg: _Image, cfg: ImageConfig) -> np.ndarray:
    try:
        return preprocess_image(_load(seg), cfg)
    except ImageError as err:
        if str(err).startswith(seg.where):
            raise
        raise ImageError(f"{seg.where}: {err}") from err


def render_text(messages: Sequence[Message], fmt: ChatFormat | None = None, **kwargs) -> str:
    """``ChatFormat.render_text`` with the default (Apriel) format unless ``fmt`` is given."""
    return (fmt or ChatFormat()).render_text(messages, **kwargs)


# ----------------------------------------------------------------------------------------- parsing


@dataclass
class ParsedResponse:
    """A model output split into parts.

    ``tool_calls`` holds the parsed calls. Malformed tool-call JSON does not raise (generations are
    often cut off or slightly wrong, and an evaluation loop should score them, not crash): the raw
    text is kept in ``tool_calls_raw`` and ``tool_calls_error`` says what was wrong.
    ``truncated`` is True when an end marker (``[END FINAL RESPONSE]``, ``</think>``,
    ``</tool_calls>``) or the final response itself is missing.
    """

    reasoning: str | None
    answer: str
    tool_calls: list[dict] = field(default_factory=list)
    tool_calls_raw: str | None = None
    tool_calls_error: str | None = None
    truncated: bool = False


def _between(text: str, start: str, end: str) -> tuple[str, str | None, bool]:
    """(text before ``start``, text between the markers or None if no start, end marker missing)."""
    i = text.find(start)
    if i < 0:
        return text, None, False
    rest = text[i + len(start):]
    j = rest.find(end)
    return text[:i], (rest if j < 0 else rest[:j]), j < 0


def parse_response(text: str) -> ParsedResponse:
    """Reasoning, answer and tool calls of a generated assistant response (any of the modes).

    Accepts output with or without the parts a generation prompt supplied (the reasoning prefix,
    ``<think>``). Stray ``<|end|>``, ``<s>`` and ``</s>`` are removed first. Only the first
    ``<tool_calls>`` block is read (the formats write one). Limitation: a think-mode output whose
    ``<think>`` came from the prompt and that was cut off before ``</think>`` has no marker left,
    so it parses as a plain answer.
    """
    for stray in (END_TAG, "</s>", "<s>"):
        text = text.replace(stray, "")
    parsed = ParsedResponse(None, "")

    # Tool calls can follow any body; take them out first.
    head, raw, open_ended = _between(text, TOOL_CALLS_OPEN, TOOL_CALLS_CLOSE)
    if raw is not None:
        tail = "" if open_ended else text[len(head) + len(TOOL_CALLS_OPEN) + len(raw) + len(TOOL_CALLS_CLOSE):]
        text = head + tail
        parsed.tool_calls_raw, parsed.truncated = raw, open_ended
        try:
            calls = json.loads(raw)
            if isinstance(calls, dict):
                calls = [calls]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
                raise ValueError("expected a list of objects with a 'name'")
            parsed.tool_calls = calls
        except ValueError as err:  # JSONDecodeError is a ValueError
            parsed.tool_calls_error = f"{'unterminated ' if open_ended else ''}tool calls: {err}"

    body = text.strip()
    if body.startswith(NOTHINK):
        body = body[len(NOTHINK):]
    elif THINK_CLOSE in body or body.startswith(THINK_OPEN):
        before, thoughts, open_ended = _between(body, THINK_OPEN, THINK_CLOSE)
        if thoughts is None:  # the "<think>" came from the generation prompt
            thoughts, _, body = body.partition(THINK_CLOSE)
        else:
            body = "" if open_ended else body[len(before) + len(THINK_OPEN) + len(thoughts) + len(THINK_CLOSE):]
        parsed.reasoning = thoughts.strip()
        parsed.truncated |= open_ended
    before, answer, open_ended = _between(body, BEGIN_FINAL, END_FINAL)
    if answer is not None:
        parsed.answer = answer.strip()
        parsed.truncated |= open_ended
        if parsed.reasoning is None:
            parsed.reasoning = before.strip().removeprefix(REASONING_PREFIX.strip()).strip()
    elif body.lstrip().startswith(REASONING_PREFIX.strip()):
        # Reasoning started but no final response yet: cut off mid-thought.
        parsed.reasoning = body.strip().removeprefix(REASONING_PREFIX.strip()).strip()
        parsed.truncated = True
    else:
        parsed.answer = body.strip()
    return parsed
