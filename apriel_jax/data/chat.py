"""Chat conversations (text, images, tools) -> one training :class:`Document`, and model output -> parts.

Formats (``ChatFormat.mode``):

* ``"apriel"``: Apriel-1.5-Thinker's chat template (the jinja template in the checkpoint's
  ``tokenizer_config.json``), character for character. When a checkpoint's own template is given
  (``ChatFormat(template=ChatTemplate.from_checkpoint(path))``), it renders instead, the way
  transformers does (:mod:`apriel_jax.data.chat_template`); the built-in renderer gives the same text and
  token ids (tests compare both with transformers). Role tags are *plain text*::

      <s><|system|>\\n{DEFAULT}{system message}\\n<|end|>\\n<|user|>\\n{user}\\n<|end|>\\n<|assistant|>\\n
      Here are my reasoning steps:\\n{thoughts}\\n[BEGIN FINAL RESPONSE]\\n{answer}\\n[END FINAL RESPONSE]
      \\n<|end|>\\n</s>

  As the template does: each system message is its own block, the default system prompt followed directly
  (no separator) by the message's text; without a system message the block holds the default prompt alone.
  With tools, each system block ends with ``\\n`` and the tools preamble; a conversation without a system
  message gets a first block of the default prompt, the preamble and the tool-call instructions, and then
  the default block as well. Tools are listed one a line as Python writes a dict (the template's
  ``|string``). An assistant turn's tool calls follow its text after ``\\n`` as
  ``<tool_calls>[{"name": "…", "arguments": {…}, "id": "…"}, …]</tool_calls>``; the ids are left out in the
  conversation's last message (the template's ``add_tool_id``), and wherever a call has none. The
  generation prompt is ``<|assistant|>\\n``, written only after a message that is not an assistant's, so
  the reply, "Here are my reasoning steps:" included, is the target. ``add_reasoning_prefix=True``
  (built in only, not the template's) moves that prefix into the assistant header, a prompt.
* ``"think"`` / ``"nothink"`` (Phi-4-reasoning-vision mode tags, so one model can do both; **not part of
  Apriel-1.5's template**, always rendered by the built-in renderer): the assistant text is
  ``<think>{thoughts}</think>\\n[BEGIN FINAL RESPONSE]\\n{answer}\\n[END FINAL RESPONSE]`` or
  ``<nothink>{answer}``; everything else as in ``"apriel"`` (the reasoning prefix is not used). Their
  generation prompt ends with the mode tag, so the caller's choice of mode decides the output.
* ``"mistral_instruct"``: Pixtral-12B's own ``[INST]…[/INST]`` layout, token for token what
  mistral-common's v3 tekken instruct encoder produces (tests compare the two). Mirrored details:
  system messages are joined by ``\\n\\n`` and prepended to the *last* user turn; adjacent text parts
  are joined by ``\\n\\n``; each text part / image is tokenized on its own; a user turn of texts
  followed by a single image gets the image moved first; assistant text is right-stripped of spaces.
  No default system prompt, no tools, no reasoning (ValueError).

Messages are OpenAI/HF-like dicts: ``{"role": "system"|"user"|"assistant"|"tool", "content": str |
[{"type": "text", "text": ...} | {"type": "image", "image": PIL image | array | path | bytes}],
"reasoning": str (assistant thoughts), "tool_calls": [{"name", "arguments", "id"?}]}``. Tool calls in
OpenAI's nested ``{"function": {...}}`` form and JSON-string arguments are accepted too; a JSON string is
written as given, a dict as ``json.dumps`` writes it. Apart from user turns, a message's text parts are
joined. System messages come before all others.

In the built-in renderer, special tokens (``<s>``, ``</s>``, ``[INST]``, the image layout) are placed by
code with ids looked up by string; text goes through ``tokenizer.encode`` as plain text, so user text can
never inject them (a template's control tokens are kept out of user text the same way, see
:mod:`~apriel_jax.data.chat_template`). Adjacent text pieces with the same loss role are tokenized as one
string (as a template + processor would), except in ``mistral_instruct`` mode, which tokenizes piece by
piece as mistral-common does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from .chat_segments import Image as _Image
from .chat_segments import Segment, Special, Text, merge_texts
from .chat_template import ChatTemplate
from .images import ImageConfig, ImageError, image_token_layout, load_image, patchify, preprocess_image
from .tokenizer import Tokenizer
from .types import Document, ImagePatches

__all__ = ["ChatFormat", "ChatTemplate", "DEFAULT_SYSTEM_PROMPT", "ParsedResponse", "parse_response", "render_text"]

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
# The Apriel-1.5 template's wording, "<tool_call>" in the instructions included.
TOOLS_PREAMBLE = (
    "You are provided with function signatures within <available_tools></available_tools> XML tags. "
    "You may call one or more functions to assist with the user query. Don't make assumptions about the "
    "arguments. You should infer the argument values from previous user responses and the system message. "
    "Here are the available tools:\n"
)
TOOL_CALL_INSTRUCTIONS = (
    "Return all function calls as a list of json objects within <tool_call></tool_call> XML tags. "
    "Each json object should contain a function name and arguments as follows:\n"
    '<tool_calls>[{"name": <function-name-1>, "arguments": <args-dict-1>}, '
    '{"name": <function-name-2>, "arguments": <args-dict-2>},...]</tool_calls>'
)
MODES = ("apriel", "think", "nothink", "mistral_instruct")
_ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]


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


@dataclass(frozen=True)
class _ToolCall:
    name: str
    arguments: str  # JSON text, written as it is
    id: str | None


def _tool_call(call: dict, where: str) -> _ToolCall:
    """A call from our form ``{"name", "arguments", "id"?}`` or OpenAI's ``{"function": {...}, "id"}``."""
    fn = call.get("function", call)
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: tool call {fn.get('name')!r} has invalid JSON arguments: {err}") from err
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    call_id = call.get("id")
    return _ToolCall(str(fn["name"]), arguments, None if call_id is None else str(call_id))


def _tool_calls_text(calls: Sequence[_ToolCall], with_ids: bool) -> str:
    """The template's tool-call block: name and id spliced in as they are, the arguments' JSON as given."""
    items = []
    for c in calls:
        item = '{"name": "' + c.name + '", "arguments": ' + c.arguments
        if with_ids and c.id is not None:
            item += ', "id": "' + c.id + '"'
        items.append(item + "}")
    return "\n" + TOOL_CALLS_OPEN + "[" + ", ".join(items) + "]" + TOOL_CALLS_CLOSE


def _tools_listing(tools: Sequence[dict]) -> str:
    # str(tool), not JSON: the template writes each tool with jinja's |string, i.e. Python's str(dict).
    listing = "".join(f"{tool}\n" for tool in tools)
    return TOOLS_PREAMBLE + "<available_tools>\n" + listing + "</available_tools>"


def _check_roles(messages: Sequence[Message]) -> None:
    """ValueError for an unknown role or a system message after a non-system one."""
    seen_other = False
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ValueError(f"message {i}: role must be one of {_ROLES}, got {m!r:.80}")
        if m["role"] != "system":
            seen_other = True
        elif seen_other:
            raise ValueError(f"message {i}: system messages must come before all others")


# ------------------------------------------------------------------------------------------ format


@dataclass(frozen=True)
class ChatFormat:
    """How conversations become documents; see the module docstring for the layouts.

    ``template``: a checkpoint's chat template, used for mode ``"apriel"`` in place of the built-in
    renderer (the other modes are not Apriel-1.5's and refuse one). ``system_prompt`` and
    ``add_reasoning_prefix`` are built-in options; a template decides both itself.
    """

    mode: str = "apriel"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Apriel only. False (the template's way): the generation prompt is "<|assistant|>\n" and the model
    # writes "Here are my reasoning steps:\n" itself, so in training it is the first target text of a
    # reply. True: the prefix is part of the assistant header, a prompt for both training and generation.
    add_reasoning_prefix: bool = False
    image_cfg: ImageConfig = field(default_factory=ImageConfig)
    template: ChatTemplate | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.template is not None:
            if self.mode != "apriel":
                raise ValueError(f"a chat template renders mode 'apriel' only; mode {self.mode!r} is built in")
            if self.system_prompt != DEFAULT_SYSTEM_PROMPT or self.add_reasoning_prefix:
                raise ValueError("system_prompt and add_reasoning_prefix are built-in options; the template "
                                 "decides the system prompt and the generation prompt")

    # ---------------------------------------------------------------- apriel / think / nothink

    def _assistant_header(self) -> str:
        header = "<|assistant|>\n"
        if self.mode == "apriel" and self.add_reasoning_prefix:
            header += REASONING_PREFIX
        return header

    def _assistant_text(self, m: Message, where: str) -> str:
        """An assistant turn's text before its tool calls (after the header)."""
        answer, reasoning, calls = _text_of(m, where), m.get("reasoning"), m.get("tool_calls") or []
        final = f"{BEGIN_FINAL}\n{answer}\n{END_FINAL}"
        if self.mode == "nothink":
            return NOTHINK + answer
        if self.mode == "think":
            return f"{THINK_OPEN}{reasoning or ''}{THINK_CLOSE}\n{final}"
        text = "" if self.add_reasoning_prefix else REASONING_PREFIX
        if reasoning is not None:
            text += reasoning + "\n"
        # A pure tool-call turn needs no empty final-response block.
        if answer or not calls or reasoning is not None:
            text += final
        return text

    def _system_block(self, text: str, tools) -> str:
        return f"<|system|>\n{self.system_prompt}{text}" + (f"\n{_tools_listing(tools)}" if tools else "") + \
            f"\n{END_TAG}\n"

    def _apriel_segments(self, messages, tools, add_generation_prompt) -> list[Segment]:
        _check_roles(messages)
        segs: list[Segment] = [Special("<s>", False)]
        has_system = bool(messages) and messages[0]["role"] == "system"
        if tools and not has_system:
            segs.append(Text(f"<|system|>\n{self.system_prompt}{_tools_listing(tools)}\n{TOOL_CALL_INSTRUCTIONS}"
                             f"\n{END_TAG}\n", False))
        if not has_system and self.system_prompt:
            segs.append(Text(f"<|system|>\n{self.system_prompt}\n{END_TAG}\n", False))
        for i, m in enumerate(messages):
            where = f"message {i}"
            if m["role"] == "system":
                segs.append(Text(self._system_block(_text_of(m, where), tools), False))
            elif m["role"] == "user":
                segs.append(Text("<|user|>\n", False))
                segs += [p if isinstance(p, _Image) else Text(p, False) for p in _parts(m, where, True)]
                segs.append(Text(f"\n{END_TAG}\n", False))
            elif m["role"] == "tool":
                segs.append(Text(f"<|tool_result|>\n{_text_of(m, where)}\n{END_TAG}\n", False))
            else:
                calls = [_tool_call(c, where) for c in m.get("tool_calls") or []]
                body = self._assistant_text(m, where)
                if calls:
                    body += _tool_calls_text(calls, with_ids=i < len(messages) - 1)
                segs.append(Text(self._assistant_header(), False))
                segs.append(Text(body + f"\n{END_TAG}\n", True))
                segs.append(Special("</s>", True))
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            tag = {"think": THINK_OPEN, "nothink": NOTHINK}.get(self.mode, "")
            segs.append(Text(self._assistant_header() + tag, False))
        return segs

    def _template_segments(self, messages, tools, add_generation_prompt) -> list[Segment]:
        """The conversation rendered by ``self.template``, handed the messages in the template's vocabulary:
        an assistant's content is its text as the built-in renderer writes it (reasoning prefix, thoughts,
        final-response block), its tool calls in OpenAI's form with JSON-string arguments, images bare."""
        _check_roles(messages)
        converted, images = [], []
        for i, m in enumerate(messages):
            where = f"message {i}"
            if m["role"] == "user":
                content = []
                for p in _parts(m, where, True):
                    if isinstance(p, _Image):
                        images.append(p)
                        content.append({"type": "image"})
                    else:
                        content.append({"type": "text", "text": p})
                converted.append({"role": "user", "content": content})
            elif m["role"] == "assistant":
                message = {"role": "assistant", "content": self._assistant_text(m, where)}
                calls = [_tool_call(c, where) for c in m.get("tool_calls") or []]
                if calls:
                    message["tool_calls"] = [
                        {"type": "function", "function": {"name": c.name, "arguments": c.arguments},
                         **({} if c.id is None else {"id": c.id})} for c in calls]
                converted.append(message)
            else:
                converted.append({"role": m["role"], "content": _text_of(m, where)})
        return self.template.segments(converted, images, tools=list(tools) if tools else None,
                                      add_generation_prompt=add_generation_prompt)

    # ---------------------------------------------------------------------------- mistral

    def _mistral_segments(self, messages, tools) -> list[Segment]:
        if tools:
            raise ValueError("mode 'mistral_instruct' does not render tools")
        _check_roles(messages)
        systems = [_text_of(m, f"message {i}") for i, m in enumerate(messages) if m["role"] == "system"]
        rest = [(i, m) for i, m in enumerate(messages) if m["role"] != "system"]
        system = "\n\n".join(systems)
        last_user = max((i for i, m in rest if m["role"] == "user"), default=-1)
        segs: list[Segment] = [Special("<s>", False)]
        for i, m in rest:
            where = f"message {i}"
            if m["role"] == "tool" or m.get("tool_calls") or m.get("reasoning") is not None:
                raise ValueError(f"{where}: mode 'mistral_instruct' supports no tools or reasoning")
            if m["role"] == "assistant":
                segs.append(Text(_text_of(m, where).rstrip(" "), True, boundary=True))
                segs.append(Special("</s>", True))
                continue
            prefix = system + "\n\n" if (i == last_user and system) else ""
            segs.append(Special("[INST]", False))
            if isinstance(m.get("content"), str):  # one string: encoded in one piece with the system text
                segs.append(Text(prefix + m["content"], False, boundary=True))
            else:
                if prefix:
                    segs.append(Text(prefix, False, boundary=True))
                segs += _mistral_chunks(_parts(m, where, True))
            segs.append(Special("[/INST]", False))
        return segs

    # ------------------------------------------------------------------------------ public

    def segments(self, messages: Sequence[Message], *, tools=None, add_generation_prompt=False) -> list[Segment]:
        if self.mode == "mistral_instruct":
            return self._mistral_segments(messages, tools)  # its prompt already ends at [/INST]
        if self.template is not None:
            return self._template_segments(messages, tools, add_generation_prompt)
        return self._apriel_segments(messages, tools, add_generation_prompt)

    def render_text(self, messages: Sequence[Message], *, tools=None, add_generation_prompt=False) -> str:
        """The conversation as one string, one ``[IMG]`` per image (for reading, not for tokenizing)."""
        out = []
        for s in self.segments(messages, tools=tools, add_generation_prompt=add_generation_prompt):
            out.append(s.text if isinstance(s, Text) else s.name if isinstance(s, Special) else "[IMG]")
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
        if self.template is not None:
            self.template.check_tokenizer(tokenizer)
        tokens: list[int] = []
        mask: list[float] = []
        images: list[ImagePatches] = []
        p = self.image_cfg.patch_size
        for seg in merge_texts(self.segments(messages, tools=tools, add_generation_prompt=add_generation_prompt)):
            if isinstance(seg, _Image):
                pixels = _preprocess(seg, self.image_cfg)
                patches, positions = patchify(pixels, p)
                images.append(ImagePatches(patches, positions))
                ids = image_token_layout(pixels.shape[0] // p, pixels.shape[1] // p, tokenizer.image_id,
                                         tokenizer.image_break_id, tokenizer.image_end_id)
                tokens += ids
                mask += [0.0] * len(ids)
                continue
            ids = tokenizer.encode(seg.text) if isinstance(seg, Text) else [tokenizer.special_id(seg.name)]
            tokens += ids
            mask += [1.0 if (seg.target or loss == "all") else 0.0] * len(ids)
        if mask:
            mask[0] = 0.0
        return Document(np.asarray(tokens, np.int32), np.asarray(mask, np.float32), images, source)


def _mistral_chunks(parts: list) -> list[Segment]:
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
    return [p if isinstance(p, _Image) else Text(p, False, boundary=True) for p in merged]


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
