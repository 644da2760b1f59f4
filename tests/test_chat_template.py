"""Apriel chat rendering = the checkpoint's chat template.

The reference is transformers: its ``render_jinja_template`` renders the Apriel-1.5 template
(tests/data/apriel_1p5_chat_template.jinja) and the text is tokenized the way an HF tokenizer with a
Pixtral processor does it: cut at the added tokens (``<s>``, ``</s>``), each ``[IMG]`` expanded into the
image's layout, the rest encoded as text by the real Tekken tokenizer. The built-in renderer and the
template path of ``ChatFormat`` must both give that text and those ids, on a broad set of conversations.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apriel_jax.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat, ChatTemplate
from apriel_jax.data.chat_template import ChatTemplateError
from apriel_jax.data.images import ImageConfig, image_token_layout, patchify, preprocess_image
from apriel_jax.data.tokenizer import load_tokenizer, pixtral_tekken_path

TEMPLATE_SOURCE = (Path(__file__).parent / "data" / "apriel_1p5_chat_template.jinja").read_text()
CFG = ImageConfig(longest_edge=64)
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"name": "add", "description": "a + b, for numbers", "strict": True, "note": None},
]


@pytest.fixture(scope="module")
def tekken():
    return load_tokenizer(pixtral_tekken_path())


@pytest.fixture(scope="module")
def builtin():
    return ChatFormat(image_cfg=CFG)


@pytest.fixture(scope="module")
def templated():
    return ChatFormat(image_cfg=CFG, template=ChatTemplate(TEMPLATE_SOURCE))


def _image(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _user(*parts):
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                        {"type": "image", "image": p} for p in parts]}


def _call(name, arguments, call_id=None, openai=False):
    if openai:
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"name": name, "arguments": arguments, **({"id": call_id} if call_id else {})}


# (messages, tools, add_generation_prompt): our chat-record form.
CONVERSATIONS = {
    "prompt_only": ([{"role": "user", "content": "What is 2+2?"}], None, True),
    "system_and_reply": ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "reasoning": "Add them.", "content": "4"}], None, False),
    "empty_system": ([{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}], None, True),
    "two_systems": ([{"role": "system", "content": "Be terse."}, {"role": "system", "content": [
        {"type": "text", "text": "Use metric units."}]}, {"role": "user", "content": "Height of Everest?"},
                     {"role": "assistant", "reasoning": "Known fact.", "content": "8849 m"}], None, False),
    "multi_turn": ([{"role": "user", "content": "Name a prime."},
                    {"role": "assistant", "reasoning": "2 is prime.", "content": "2"},
                    {"role": "user", "content": "Another one?"},
                    {"role": "assistant", "reasoning": "3 is prime too.", "content": "3"},
                    {"role": "user", "content": "And a third?"}], None, True),
    "tools_without_system": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning": "I need the weather.", "content": "",
         "tool_calls": [_call("get_weather", {"city": "Paris"}, "call_1")]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "reasoning": "It is 21 degrees.", "content": "21°C in Paris."}], TOOLS, False),
    "tools_with_system": ([
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Add 2 and 3, then the weather in Oslo."},
        {"role": "assistant", "content": "",
         "tool_calls": [_call("add", '{"a":2,"b":3}', "c1", openai=True),
                        _call("get_weather", '{\n  "city": "Oslo"\n}', "c2", openai=True)]},
        {"role": "tool", "content": "5"}, {"role": "tool", "content": [{"type": "text", "text": "-3°C"}]},
        {"role": "user", "content": "Thanks. Summarise."}], TOOLS, True),
    "tool_call_is_the_last_message": ([
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "reasoning": "Call the tool.", "content": "Checking.",
         "tool_calls": [_call("get_weather", {"city": "Rome"}, "call_9")]}], TOOLS, False),
    "images_in_several_turns": ([
        _user("What is this?", _image(0, 40, 56)),
        {"role": "assistant", "reasoning": "A noise pattern.", "content": "Noise."},
        _user(_image(1, 70, 30), "and these two:", _image(2, 20, 20), "compare them"),
        {"role": "assistant", "reasoning": "Both random.", "content": "Similar."},
        _user(_image(3, 33, 64))], None, True),
    "unicode_and_text_parts": ([
        {"role": "system", "content": "Réponds en français."}, _user("Bonjour, ", "ça va ? 👋"),
        {"role": "assistant", "reasoning": "Salutation.",
         "content": [{"type": "text", "text": "Très bien, merci !"}]}], None, False),
    "answer_without_reasoning": ([{"role": "user", "content": "Say hi."},
                                  {"role": "assistant", "content": "hi"}], None, True),
    "after_a_tool_result": ([
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Lima"}, "x")]},
        {"role": "tool", "content": "sunny"}], TOOLS, True),
}


def _hf_messages(messages):
    """Our messages as the template reads them (HF/OpenAI form), written out independently of chat.py:
    the assistant's reasoning and answer inside its content, tool calls nested with JSON-string arguments."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            answer = m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
            content = "Here are my reasoning steps:\n"
            if m.get("reasoning") is not None:
                content += m["reasoning"] + "\n"
            if answer or not m.get("tool_calls") or m.get("reasoning") is not None:
                content += f"[BEGIN FINAL RESPONSE]\n{answer}\n[END FINAL RESPONSE]"
            hf = {"role": "assistant", "content": content}
            if m.get("tool_calls"):
                hf["tool_calls"] = []
                for c in m["tool_calls"]:
                    fn = c.get("function", c)
                    args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"])
                    hf["tool_calls"].append({"id": c["id"], "type": "function",
                                             "function": {"name": fn["name"], "arguments": args}})
            out.append(hf)
        elif isinstance(m["content"], list):
            out.append({"role": m["role"], "content": [p if p["type"] == "text" else {"type": "image"}
                                                       for p in m["content"]]})
        else:
            out.append(m)
    return out


def _images(messages):
    return [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image"]


def _transformers_text(messages, tools, add_generation_prompt) -> str:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = utils.render_jinja_template([_hf_messages(messages)], tools=tools, chat_template=TEMPLATE_SOURCE,
                                              add_generation_prompt=add_generation_prompt,
                                              bos_token="<s>", eos_token="</s>")
    return rendered[0]


def _hf_style_ids(text: str, images, tok) -> list[int]:
    """An HF tokenizer + Pixtral processor: cut at added tokens, [IMG] -> the image's layout."""
    ids, pending = [], iter(images)
    for piece in re.split(r"(<s>|</s>|\[IMG\])", text):
        if piece == "[IMG]":
            pixels = preprocess_image(next(pending), CFG)
            ids += image_token_layout(pixels.shape[0] // 16, pixels.shape[1] // 16, tok.image_id,
                                      tok.image_break_id, tok.image_end_id)
        elif piece in ("<s>", "</s>"):
            ids.append(tok.special_id(piece))
        elif piece:
            ids += tok.encode(piece)
    return ids


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_builtin_and_template_match_transformers(name, tekken, builtin, templated):
    messages, tools, gen = CONVERSATIONS[name]
    want_text = _transformers_text(messages, tools, gen)
    want_ids = _hf_style_ids(want_text, _images(messages), tekken)

    for fmt in (builtin, templated):
        assert fmt.render_text(messages, tools=tools, add_generation_prompt=gen) == want_text
        doc = fmt.encode(messages, tekken, tools=tools, add_generation_prompt=gen)
        assert doc.tokens.tolist() == want_ids
        assert doc.num_patches == sum(patchify(preprocess_image(im, CFG))[0].shape[0] for im in _images(messages))

    # Same targets too: each reply, its "\n<|end|>\n" and </s>.
    a = builtin.encode(messages, tekken, tools=tools, add_generation_prompt=gen)
    b = templated.encode(messages, tekken, tools=tools, add_generation_prompt=gen)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    for x, y in zip(a.images, b.images):
        np.testing.assert_array_equal(x.patches, y.patches)
    replies = sum(m["role"] == "assistant" for m in messages)
    assert (np.diff(np.r_[0, a.loss_mask]) == 1).sum() == replies
    assert (a.tokens[a.loss_mask == 1] == tekken.eos_id).sum() == replies


def test_the_two_divergences_are_gone(builtin):
    text = builtin.render_text([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "q"}],
                               tools=TOOLS[1:])
    # The system message follows the default prompt directly, then the template's tools preamble.
    assert text.startswith(f"<s><|system|>\n{DEFAULT_SYSTEM_PROMPT}Use tools.\nYou are provided with function "
                           "signatures within <available_tools></available_tools> XML tags.")
    # Tools are listed as Python writes a dict: the template's |string.
    assert "{'name': 'add', 'description': 'a + b, for numbers', 'strict': True, 'note': None}\n</available" in text
    calls = builtin.render_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        _call("f", '{"x":1}', "a"), _call("g", {"y": "é"}, "b")]}, {"role": "tool", "content": "r"}])
    # Tool calls: after "\n" even when the text before is empty; JSON-string arguments as given.
    assert ('<|assistant|>\nHere are my reasoning steps:\n\n<tool_calls>[{"name": "f", "arguments": {"x":1}, '
            '"id": "a"}, {"name": "g", "arguments": {"y": "é"}, "id": "b"}]</tool_calls>\n<|end|>\n</s>') in calls


def test_control_tokens_in_user_text_stay_text(tekken, builtin, templated):
    messages = [{"role": "user", "content": "a </s> b <s> [IMG] c"}, {"role": "assistant", "content": "</s>?"}]
    docs = [fmt.encode(messages, tekken) for fmt in (builtin, templated)]
    np.testing.assert_array_equal(docs[0].tokens, docs[1].tokens)
    np.testing.assert_array_equal(docs[0].loss_mask, docs[1].loss_mask)
    tokens = docs[0].tokens.tolist()
    assert tokens.count(tekken.eos_id) == 1 and tokens.count(tekken.bos_id) == 1 and tekken.image_id not in tokens
    assert templated.render_text(messages) == builtin.render_text(messages)


def test_from_checkpoint(tmp_path):
    assert ChatTemplate.from_checkpoint(tmp_path) is None
    assert ChatTemplate.from_checkpoint(tmp_path / "missing") is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE_SOURCE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    found = ChatTemplate.from_checkpoint(tmp_path)
    assert found == ChatTemplate(TEMPLATE_SOURCE, origin=str(tmp_path / "tokenizer_config.json"))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ bos_token }}default"}]}))
    assert ChatTemplate.from_checkpoint(tmp_path).source == "{{ bos_token }}default"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}jinja")  # transformers' first choice
    assert ChatTemplate.from_checkpoint(tmp_path).render([]) == "<s>jinja"


def test_template_settings_and_errors(tekken, templated):
    template = templated.template
    with pytest.raises(ValueError, match="mode 'apriel' only"):
        ChatFormat(mode="think", template=template)
    with pytest.raises(ValueError, match="built-in options"):
        ChatFormat(add_reasoning_prefix=True, template=template)
    assert pickle.loads(pickle.dumps(templated)) == templated  # grain workers get a copy
    # The template needs ids on tool calls that are not in the last message; the built-in leaves them out.
    no_id = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [_call("f", {})]},
             {"role": "tool", "content": "r"}]
    with pytest.raises(ChatTemplateError, match="UndefinedError"):
        templated.render_text(no_id)
    assert '<tool_calls>[{"name": "f", "arguments": {}}]</tool_calls>' in ChatFormat().render_text(no_id)
    with pytest.raises(ChatTemplateError, match=r"\[INST\]"):
        ChatFormat(template=ChatTemplate("{{ bos_token }}[INST]{{ messages[0]['content'] }}")).encode(
            [{"role": "user", "content": "q"}], tekken)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% if %}").render([])


@pytest.mark.parametrize("mode", ["apriel", "think"])
def test_chat_prompts_with_the_template(monkeypatch, tekken, mode):
    """chat() renders mode apriel with the checkpoint's template (transformers' ids); think stays built in."""
    from types import SimpleNamespace

    import apriel_jax.chat as chat_module

    prompts = []
    monkeypatch.setattr(chat_module, "prompt_batch", lambda rows, **kw: prompts.append(rows[0][0]) or {})
    reply_ids = tekken.encode("Fine.\n[BEGIN FINAL RESPONSE]\nYes\n[END FINAL RESPONSE]") + [tekken.eos_id]
    monkeypatch.setattr(chat_module, "generate", lambda model, batch, sampling, rng: (np.asarray([reply_ids]), None))
    cfg = SimpleNamespace(image_token_id=tekken.image_id, decoder=SimpleNamespace(vocab_size=tekken.vocab_size),
                          vision=SimpleNamespace(image_size=1024, patch_size=16))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is 7 prime?"}]

    reply = chat_module.chat(SimpleNamespace(config=cfg), tekken, messages, mode=mode,
                             template=ChatTemplate(TEMPLATE_SOURCE))
    if mode == "apriel":
        assert prompts == [_hf_style_ids(_transformers_text(messages, None, True), [], tekken)]
    else:
        assert tekken.decode(prompts[0]).endswith("<|assistant|>\n<think>")
    assert (reply.reasoning, reply.answer) == ("Fine.", "Yes")
