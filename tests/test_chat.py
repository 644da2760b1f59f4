"""Chat rendering, loss masks, images and response parsing (apriel/chat.py)."""

import io

import numpy as np
import pytest
from PIL import Image

from apriel_jax.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat, parse_response, render_text
from apriel_jax.data.images import ImageConfig, ImageError, patchify, preprocess_image
from apriel_jax.data.tokenizer import load_tokenizer, pixtral_tekken_path, train_tiny_sentencepiece

CFG = ImageConfig(longest_edge=64)
TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def tekken():
    return load_tokenizer(pixtral_tekken_path())


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    texts = ["<|user|>\nWhat is the weather?\n<|end|>\n<|assistant|>\n[BEGIN FINAL RESPONSE]\nSunny."] * 8
    return train_tiny_sentencepiece(texts, 400, tmp_path_factory.mktemp("sp") / "tiny")


@pytest.fixture
def image(rng):
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))  # 3 x 4 patches


def _conversation(image):
    return [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in this city?"},
                                     {"type": "image", "image": image}]},
        {"role": "assistant", "reasoning": "I need the weather.", "content": "",
         "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "reasoning": "It is 21 degrees.", "content": "21°C in Paris."},
    ]


# The Apriel-1.5 template's layout (tests/test_chat_template.py checks it against the template itself): the
# system message follows the default prompt directly, the tools preamble ends its block, tools are listed
# as Python dicts, and the conversation's last message would lose its tool-call ids.
GOLDEN = (
    "<s><|system|>\n" + DEFAULT_SYSTEM_PROMPT + "Use tools when needed.\n"
    "You are provided with function signatures within <available_tools></available_tools> XML tags. "
    "You may call one or more functions to assist with the user query. Don't make assumptions about the "
    "arguments. You should infer the argument values from previous user responses and the system message. "
    "Here are the available tools:\n"
    "<available_tools>\n"
    "{'name': 'get_weather', 'description': 'Weather of a city', "
    "'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}}}\n"
    "</available_tools>\n"
    "<|end|>\n"
    "<|user|>\nWeather in this city?[IMG]\n<|end|>\n"
    "<|assistant|>\nHere are my reasoning steps:\nI need the weather.\n"
    "[BEGIN FINAL RESPONSE]\n\n[END FINAL RESPONSE]\n"
    '<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]</tool_calls>\n'
    "<|end|>\n</s>"
    '<|tool_result|>\n{"temp": 21}\n<|end|>\n'
    "<|assistant|>\nHere are my reasoning steps:\nIt is 21 degrees.\n"
    "[BEGIN FINAL RESPONSE]\n21°C in Paris.\n[END FINAL RESPONSE]\n<|end|>\n</s>"
)


def test_golden_apriel_render(image):
    assert render_text(_conversation(image), tools=TOOLS) == GOLDEN
    gen = render_text(_conversation(image)[:2], add_generation_prompt=True)
    assert gen.endswith("<|user|>\nWeather in this city?[IMG]\n<|end|>\n<|assistant|>\n")
    prefilled = ChatFormat(add_reasoning_prefix=True).render_text([{"role": "user", "content": "Hi"}],
                                                                  add_generation_prompt=True)
    assert prefilled == (f"<s><|system|>\n{DEFAULT_SYSTEM_PROMPT}\n<|end|>\n<|user|>\nHi\n<|end|>\n<|assistant|>\n"
                         "Here are my reasoning steps:\n")


def test_openai_style_tool_calls_render_the_same(image):
    msgs = _conversation(image)
    msgs[2] = dict(msgs[2], tool_calls=[{"id": "call_1", "type": "function",
                                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}])
    assert render_text(msgs, tools=TOOLS) == GOLDEN
    msgs[2]["tool_calls"][0]["function"]["arguments"] = "{bad"
    with pytest.raises(ValueError, match="message 2.*get_weather.*invalid JSON"):
        render_text(msgs)


def test_think_and_nothink_modes():
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning": "Add.", "content": "4"}]
    head = f"<s><|system|>\n{DEFAULT_SYSTEM_PROMPT}\n<|end|>\n<|user|>\n2+2?\n<|end|>\n<|assistant|>\n"
    think = ChatFormat(mode="think")
    assert think.render_text(msgs) == (
        head + "<think>Add.</think>\n[BEGIN FINAL RESPONSE]\n4\n[END FINAL RESPONSE]\n<|end|>\n</s>")
    assert ChatFormat(mode="nothink").render_text(msgs) == head + "<nothink>4\n<|end|>\n</s>"
    assert think.render_text(msgs[:1], add_generation_prompt=True) == head + "<think>"
    assert ChatFormat(mode="nothink").render_text(msgs[:1], add_generation_prompt=True) == head + "<nothink>"
    custom = ChatFormat(system_prompt="")
    assert custom.render_text(msgs[:1]) == "<s><|user|>\n2+2?\n<|end|>\n"


def _runs(doc, tok):
    """Decoded text of each contiguous run of targets."""
    runs, cur = [], []
    for t, m in zip(doc.tokens.tolist(), doc.loss_mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("tok_name", ["tekken", "sp_tok"])
def test_encode_tokens_masks_and_images(tok_name, image, request):
    tok = request.getfixturevalue(tok_name)
    fmt = ChatFormat(image_cfg=CFG)
    msgs = _conversation(image)
    doc = fmt.encode(msgs, tok, tools=TOOLS, source="chat")
    assert doc.source == "chat" and doc.tokens[0] == tok.bos_id and doc.tokens[-1] == tok.eos_id

    # The ids are the rendered text with the image expanded: decode agrees with render_text.
    layout = np.isin(doc.tokens, [tok.image_id, tok.image_break_id, tok.image_end_id])
    assert (doc.tokens == tok.image_id).sum() == 12 and doc.num_patches == 12
    img_start = int(np.flatnonzero(layout)[0])
    assert doc.tokens[img_start:img_start + 15].tolist() == ([10] * 4 + [12]) * 2 + [10] * 4 + [13]
    text = tok.decode(np.r_[doc.tokens[:img_start], [tok.image_id], doc.tokens[img_start + 15:]],
                      skip_special_tokens=False)
    assert text == render_text(msgs, tools=TOOLS)
    want_patches, want_pos = patchify(preprocess_image(image, CFG))
    np.testing.assert_array_equal(doc.images[0].patches, want_patches)
    np.testing.assert_array_equal(doc.images[0].positions, want_pos)

    # responses: exactly the two assistant bodies with their closing "\n<|end|>\n</s>".
    assert _runs(doc, tok) == [
        "Here are my reasoning steps:\nI need the weather.\n[BEGIN FINAL RESPONSE]\n\n[END FINAL RESPONSE]\n"
        '<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]</tool_calls>'
        "\n<|end|>\n</s>",
        "Here are my reasoning steps:\nIt is 21 degrees.\n[BEGIN FINAL RESPONSE]\n21°C in Paris.\n[END FINAL RESPONSE]"
        "\n<|end|>\n</s>",
    ]
    everything = fmt.encode(msgs, tok, tools=TOOLS, loss="all")
    np.testing.assert_array_equal(everything.tokens, doc.tokens)
    assert (everything.loss_mask == (~layout & (np.arange(len(doc)) > 0))).all()
    assert not doc.loss_mask[layout].any() and not everything.loss_mask[doc.tokens == tok.image_id].any()
    with pytest.raises(ValueError, match="loss"):
        fmt.encode(msgs, tok, loss="some")


def test_reasoning_prefix_is_a_target_unless_prefilled(tekken):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "reasoning": "R", "content": "A"}]
    doc = ChatFormat().encode(msgs, tekken)
    assert _runs(doc, tekken) == [
        "Here are my reasoning steps:\nR\n[BEGIN FINAL RESPONSE]\nA\n[END FINAL RESPONSE]\n<|end|>\n</s>"]
    prefilled = ChatFormat(add_reasoning_prefix=True)
    assert _runs(prefilled.encode(msgs, tekken), tekken) == [
        "R\n[BEGIN FINAL RESPONSE]\nA\n[END FINAL RESPONSE]\n<|end|>\n</s>"]
    gen = prefilled.encode(msgs[:1], tekken, add_generation_prompt=True)
    assert not gen.loss_mask.any()
    assert tekken.decode(gen.tokens).endswith("<|assistant|>\nHere are my reasoning steps:\n")


def test_image_sources_and_errors(tmp_path, image, tekken):
    path = tmp_path / "pic.png"
    image.save(path)
    fmt = ChatFormat(image_cfg=CFG)

    def user(img):
        return [{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image", "image": img}]}]

    ref = fmt.encode(user(image), tekken)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    for source in (str(path), buf.getvalue(), np.asarray(image)):
        doc = fmt.encode(user(source), tekken)
        np.testing.assert_array_equal(doc.tokens, ref.tokens)
        np.testing.assert_array_equal(doc.images[0].patches, ref.images[0].patches)
    with pytest.raises(ImageError, match=r"message 0, image 0: .*missing\.png"):
        fmt.encode(user(str(tmp_path / "missing.png")), tekken)
    with pytest.raises(ImageError, match=r"message 0, image 0: cannot decode"):
        fmt.encode(user(b"not an image"), tekken)
    with pytest.raises(ImageError, match="message 0, image 0: expected"):
        fmt.encode(user(42), tekken)
    assert fmt.render_text(user(str(tmp_path / "missing.png"))).count("[IMG]") == 1  # rendering never loads


def test_invalid_conversations(image):
    with pytest.raises(ValueError, match="message 1: system messages must come before"):
        render_text([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(ValueError, match="message 0: role"):
        render_text([{"role": "bot", "content": "a"}])
    with pytest.raises(ValueError, match="only supported in user"):
        render_text([{"role": "assistant", "content": [{"type": "image", "image": image}]}])
    with pytest.raises(ValueError, match="mode"):
        ChatFormat(mode="chatml")
    with pytest.raises(ValueError, match="tools"):
        ChatFormat(mode="mistral_instruct").render_text([{"role": "user", "content": "a"}], tools=TOOLS)


# ------------------------------------------------------------------------------------------ parsing


def test_parse_apriel():
    full = "Here are my reasoning steps:\nStep 1.\n[BEGIN FINAL RESPONSE]\nParis\n[END FINAL RESPONSE]\n<|end|>\n</s>"
    p = parse_response(full)
    assert (p.reasoning, p.answer, p.tool_calls, p.truncated) == ("Step 1.", "Paris", [], False)
    # The prefix came from the generation prompt, so the output starts with the thoughts.
    p = parse_response("Step 1.\n[BEGIN FINAL RESPONSE]\nParis\n[END FINAL RESPONSE]<|end|>")
    assert (p.reasoning, p.answer, p.truncated) == ("Step 1.", "Paris", False)
    p = parse_response("Step 1.\n[BEGIN FINAL RESPONSE]\nPar")  # cut off inside the answer
    assert (p.reasoning, p.answer, p.truncated) == ("Step 1.", "Par", True)
    p = parse_response("Here are my reasoning steps:\nStep 1, then")  # cut off mid-thought
    assert (p.reasoning, p.answer, p.truncated) == ("Step 1, then", "", True)
    p = parse_response("Just text.</s>")
    assert (p.reasoning, p.answer, p.truncated) == (None, "Just text.", False)


def test_parse_think_and_nothink():
    p = parse_response("<think>Hmm.</think>\n[BEGIN FINAL RESPONSE]\n4\n[END FINAL RESPONSE]\n<|end|>")
    assert (p.reasoning, p.answer, p.truncated) == ("Hmm.", "4", False)
    p = parse_response("Hmm.</think>\nfour")  # "<think>" was the generation prompt; bare answer
    assert (p.reasoning, p.answer, p.truncated) == ("Hmm.", "four", False)
    p = parse_response("<think>Hmm, let me")
    assert (p.reasoning, p.answer, p.truncated) == ("Hmm, let me", "", True)
    p = parse_response("<nothink>4<|end|>\n</s>")
    assert (p.reasoning, p.answer, p.truncated) == (None, "4", False)


def test_parse_tool_calls():
    text = ('Need data.\n[BEGIN FINAL RESPONSE]\n\n[END FINAL RESPONSE]\n<tool_calls>[{"name": "get_weather", '
            '"arguments": {"city": "Paris"}, "id": "c1"}]</tool_calls>\n<|end|>')
    p = parse_response(text)
    assert p.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "c1"}]
    assert (p.reasoning, p.answer, p.tool_calls_error, p.truncated) == ("Need data.", "", None, False)
    bad = parse_response('<tool_calls>[{"name": "f", "arguments": {oops}]</tool_calls>')
    assert bad.tool_calls == [] and bad.tool_calls_raw == '[{"name": "f", "arguments": {oops}]'
    assert "tool calls" in bad.tool_calls_error and not bad.truncated
    cut = parse_response('<nothink>Calling.\n<tool_calls>[{"name": "f", "argu')
    assert cut.truncated and cut.tool_calls_error.startswith("unterminated") and cut.answer == "Calling."
    not_calls = parse_response('<tool_calls>[1, 2]</tool_calls>')
    assert not_calls.tool_calls == [] and "name" in not_calls.tool_calls_error


@pytest.mark.parametrize("mode", ["apriel", "think", "nothink"])
def test_render_then_parse_round_trip(mode):
    """What a format teaches the model to write, parse_response reads back."""
    call = {"name": "f", "arguments": {"x": 1}}
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "reasoning": "because", "content": "yes", "tool_calls": [call]}]
    text = ChatFormat(mode=mode).render_text(msgs)
    response = text[text.index("<|assistant|>\n") + len("<|assistant|>\n"):]
    p = parse_response(response)
    assert (p.answer, p.tool_calls, p.truncated) == ("yes", [call], False)
    assert p.reasoning == (None if mode == "nothink" else "because")
