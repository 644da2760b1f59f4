"""SentencePiece tokenizer, the shipped Pixtral tekken file, and token-exact agreement with mistral-common."""

import shutil

import numpy as np
import pytest
from PIL import Image

from apriel_jax.data.chat import ChatFormat
from apriel_jax.data.images import ImageConfig, patch_grid, patchify, preprocess_image
from apriel_jax.data.tokenizer import (
    PIXTRAL_SPECIAL_TOKENS,
    SentencePieceTokenizer,
    TekkenTokenizer,
    load_tokenizer,
    pixtral_tekken_path,
    train_tiny_sentencepiece,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pixtral splits every image into patches of sixteen by sixteen pixels.",
    "<|user|>\nWhat is in this picture?\n<|end|>\n<|assistant|>\n[BEGIN FINAL RESPONSE]\nA fox.",
] * 4


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return train_tiny_sentencepiece(TEXTS, 400, tmp_path_factory.mktemp("sp") / "tiny")


@pytest.fixture(scope="module")
def tekken():
    return load_tokenizer(pixtral_tekken_path())


def _image(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ sentencepiece


def test_sentencepiece_special_ids_by_piece(sp_tok):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert sp_tok.vocab_size <= 400
    for i, token in enumerate(PIXTRAL_SPECIAL_TOKENS):
        assert sp_tok.special_id(token) == i
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, 11)
    assert (sp_tok.image_id, sp_tok.image_break_id, sp_tok.image_end_id) == (10, 12, 13)
    assert sp_tok.special_tokens()["<SPECIAL_19>"] == 19
    with pytest.raises(KeyError, match=r"\[IMG_END\]=13"):
        sp_tok.special_id("[NOPE]")


def test_sentencepiece_round_trip_and_plain_text(sp_tok):
    text = "Hi  fox [IMG] é\n漢字 </s> <s>!"  # double space, unseen characters (byte fallback)
    ids = sp_tok.encode(text)
    assert min(ids) >= 20, "plain text must never produce special ids"
    assert sp_tok.decode(ids) == text
    assert sp_tok.decode([1] + ids + [2]) == text
    assert sp_tok.decode([1] + ids + [10, 2], skip_special_tokens=False) == "<s>" + text + "[IMG]</s>"
    # No dummy prefix: pieces encoded separately concatenate to the same text.
    assert sp_tok.decode(sp_tok.encode("a") + sp_tok.encode("b")) == "ab"


def test_sentencepiece_load_by_file_and_directory(sp_tok, tmp_path):
    shutil.copy(sp_tok.path, tmp_path / "tokenizer.model")
    for where in (sp_tok.path, tmp_path):
        again = load_tokenizer(where)
        assert isinstance(again, SentencePieceTokenizer)
        assert again.encode(TEXTS[1]) == sp_tok.encode(TEXTS[1])
    with pytest.raises(ValueError, match="too small"):
        train_tiny_sentencepiece(TEXTS, 100, tmp_path / "x")


def test_mistral_v3_sentencepiece_model():
    """Mistral's own v3 ``tokenizer.model``: control pieces named [INST]…, bos/eos from the model."""
    path = pixtral_tekken_path().parent / "mistral_instruct_tokenizer_240323.model.v3"
    if not path.is_file():
        pytest.skip("mistral-common ships no v3 SentencePiece model")
    tok = load_tokenizer(path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 32768
    assert (tok.bos_id, tok.eos_id, tok.special_id("[INST]"), tok.special_id("[/INST]")) == (1, 2, 3, 4)
    assert tok.image_id == 10
    with pytest.raises(KeyError):
        tok.pad_id  # this model has neither a <pad> piece nor a pad id
    ids = tok.encode("[INST] hello")
    assert 3 not in ids and tok.decode(ids) == "[INST] hello"


# ------------------------------------------------------------------------------------------ tekken


def test_pixtral_tekken_file(tekken):
    assert pixtral_tekken_path().name == "tekken_240911.json"
    assert isinstance(tekken, TekkenTokenizer) and tekken.vocab_size == 131072
    assert (tekken.image_id, tekken.image_break_id, tekken.image_end_id) == (10, 12, 13)
    assert (tekken.special_id("[INST]"), tekken.special_id("[/INST]")) == (3, 4)


def _mistral():
    pytest.importorskip("cv2")
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(pixtral_tekken_path()))


def _mistral_encode(mt, messages):
    """mistral-common's own encoding of our message dicts."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage, ImageChunk, SystemMessage, TextChunk, UserMessage)
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    def chunks(content):
        if isinstance(content, str):
            return content
        return [TextChunk(text=p["text"]) if p["type"] == "text" else ImageChunk(image=p["image"]) for p in content]

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=chunks(m["content"])) for m in messages])
    return mt.encode_chat_completion(request)


def _runs(tokens, img_id, end_id):
    """(rows, cols) of each image's [IMG] block, in token order."""
    out, rows, cols = [], 0, 0
    for t in tokens:
        if t == img_id:
            cols += 1
        elif cols and t in (12, end_id):
            rows += 1
            if t == end_id:
                out.append((rows, cols // rows))
                rows = cols = 0
    return out


def test_tekken_chat_matches_mistral_common(tekken, rng):
    """Two images of different sizes (one a patch multiple, one not) in an instruct chat: identical ids.

    Both sizes stay below longest_edge, where HF's and mistral-common's resize rules agree exactly
    (see test_resize_rules_differ_only_above_longest_edge for where they do not).
    """
    mt = _mistral()
    img1, img2 = _image(rng, 64, 96), _image(rng, 40, 33)
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Hello  there "},
        {"role": "assistant", "content": "Hi! "},
        {"role": "user", "content": [{"type": "text", "text": "Look at"}, {"type": "image", "image": img1},
                                     {"type": "text", "text": " and"}, {"type": "text", "text": "this"},
                                     {"type": "image", "image": img2}]},
    ]
    want = _mistral_encode(mt, messages)
    doc = ChatFormat(mode="mistral_instruct").encode(messages, tekken, loss="all")
    assert doc.tokens.tolist() == want.tokens
    assert _runs(doc.tokens, 10, 13) == [(4, 6), (3, 3)] == _runs(want.tokens, 10, 13)
    # Pixels: the patch-multiple image is not resized by either, so only float rounding differs.
    hwc = want.images[0].transpose(1, 2, 0)
    np.testing.assert_allclose(preprocess_image(img1), hwc, atol=1e-5)
    np.testing.assert_allclose(doc.images[0].patches, patchify(hwc)[0], atol=1e-5)
    # The resized one goes through PIL vs cv2 bicubic: same size, values only close.
    assert want.images[1].shape == (3, 48, 48) and doc.images[1].patches.shape == (9, 768)
    assert np.abs(preprocess_image(img2) - want.images[1].transpose(1, 2, 0)).mean() < 0.15
    # loss="all": everything but the first token and the image layout; default: the assistant turn.
    layout = np.isin(doc.tokens, [10, 12, 13])
    assert (doc.loss_mask == (~layout & (np.arange(len(doc)) > 0))).all()
    resp = ChatFormat(mode="mistral_instruct").encode(messages, tekken)
    assert tekken.decode(resp.tokens[resp.loss_mask == 1], skip_special_tokens=False) == "Hi!</s>"


def test_tekken_single_image_last_is_moved_first(tekken, rng):
    """mistral-common's compatibility rule: [text, image] is encoded as [image, text]."""
    mt = _mistral()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe:"},
                                             {"type": "image", "image": _image(rng, 32, 80)}]}]
    want = _mistral_encode(mt, messages).tokens
    got = ChatFormat(mode="mistral_instruct").encode(messages, tekken).tokens.tolist()
    assert got == want and got[2] == 10


def test_resize_rules_differ_only_above_longest_edge(rng):
    """HF (and images.py) floor the downscaled size, mistral-common rounds it (and resizes with cv2).

    Below longest_edge nothing is rescaled and both give the same grid; above it the patch grids can
    differ by one row/column. This records the difference rather than hiding it.
    """
    pytest.importorskip("cv2")
    from mistral_common.tokens.tokenizers.image import ImageConfig as MConfig, ImageEncoder, SpecialImageIDs

    enc = ImageEncoder(MConfig(image_patch_size=16, max_image_size=64, spatial_merge_size=1),
                       SpecialImageIDs(img=10, img_break=12, img_end=13))
    cfg = ImageConfig(longest_edge=64)
    for h, w in [(40, 33), (64, 48), (100, 70), (130, 64)]:  # agreeing sizes
        cols, rows = enc._image_to_num_tokens(_image(rng, h, w))
        assert patch_grid(h, w, cfg) == (rows, cols), (h, w)
    # 152x200 -> scale 200/64: height 48.64 floors to 48 (3 rows) but rounds to 49 (4 rows).
    cols, rows = enc._image_to_num_tokens(_image(rng, 152, 200))
    assert (rows, cols) == (4, 4) and patch_grid(152, 200, cfg) == (3, 4)
