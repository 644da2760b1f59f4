"""Tokenizers (tiny trained BPE, mistral-common tekken) and prompt -> batch construction."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from apriel_jax.data.hf_inputs import from_hf_inputs
from apriel_jax.data.images import ImageConfig, image_token_layout, patchify, preprocess_image
from apriel_jax.data.prompt import encode_prompt, prompt_batch
from apriel_jax.data.tokenizer import (
    PIXTRAL_SPECIAL_TOKENS,
    HFTokenizer,
    TekkenTokenizer,
    load_tokenizer,
    train_tiny_tokenizer,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pixtral splits every image into patches of sixteen by sixteen pixels.",
    "What is in this picture? Describe it in one short sentence, please.",
] * 4


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return train_tiny_tokenizer(TEXTS, 1024, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _tekken_path():
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")
    if not os.path.isfile(path):
        pytest.skip("mistral_common ships no tekken_240911.json")
    return path


@pytest.fixture(scope="module")
def tekken():
    return load_tokenizer(_tekken_path())


# ------------------------------------------------------------------------------------------ tokenizers


def test_tiny_tokenizer_has_pixtral_special_ids(tiny_tok):
    assert isinstance(tiny_tok, HFTokenizer)
    assert tiny_tok.vocab_size == 1024
    for i, token in enumerate(PIXTRAL_SPECIAL_TOKENS):
        assert tiny_tok.special_id(token) == i
    assert [f"<SPECIAL_{i}>" in tiny_tok.special_tokens() for i in range(14, 20)] == [True] * 6
    assert (tiny_tok.bos_id, tiny_tok.eos_id, tiny_tok.pad_id) == (1, 2, 11)
    assert (tiny_tok.image_id, tiny_tok.image_break_id, tiny_tok.image_end_id) == (10, 12, 13)


def test_tiny_tokenizer_round_trip_and_plain_text(tiny_tok):
    text = "The fox describes a picture: é, 16 pixels [IMG] </s>!"
    ids = tiny_tok.encode(text)
    assert ids and min(ids) >= 20, "plain text must never produce special ids (no BOS, no [IMG] from text)"
    assert tiny_tok.decode(ids) == text
    with_specials = [tiny_tok.bos_id] + ids + [tiny_tok.eos_id]
    assert tiny_tok.decode(with_specials) == text
    assert tiny_tok.decode(with_specials, skip_special_tokens=False) == "<s>" + text + "</s>"


def test_tiny_tokenizer_reloads_identically(tiny_tok, tmp_path):
    shutil.copy(tiny_tok.path, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert isinstance(again, HFTokenizer)
    assert again.encode(TEXTS[1]) == tiny_tok.encode(TEXTS[1])
    assert again.special_tokens() == tiny_tok.special_tokens()


def test_unknown_special_token_lists_what_exists(tiny_tok):
    with pytest.raises(KeyError) as info:
        tiny_tok.special_id("[NOPE]")
    message = str(info.value)
    assert "'[NOPE]'" in message and "[IMG]=10" in message and "<pad>=11" in message


def test_tiny_tokenizer_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tiny_tokenizer(TEXTS, 100, tmp_path / "t.json")


def test_tekken_special_ids_by_string(tekken):
    assert isinstance(tekken, TekkenTokenizer)
    assert tekken.vocab_size == 131072
    assert (tekken.image_id, tekken.image_break_id, tekken.image_end_id) == (10, 12, 13)
    assert (tekken.bos_id, tekken.eos_id, tekken.pad_id) == (1, 2, 11)
    assert tekken.special_tokens()["[IMG_END]"] == 13
    with pytest.raises(KeyError, match=r"\[IMG_BREAK\]=12"):
        tekken.special_id("[NOT_A_TOKEN]")


def test_tekken_round_trip(tekken):
    text = "Hello world, é! [IMG] is text here."
    ids = tekken.encode(text)
    assert ids[0] != tekken.bos_id and min(ids) >= 1000  # tekken's 1000 special ids come first
    assert tekken.decode(ids) == text
    assert tekken.decode([tekken.bos_id] + ids, skip_special_tokens=False) == "<s>" + text


def test_load_tokenizer_by_directory_and_errors(tmp_path):
    shutil.copy(_tekken_path(), tmp_path / "tekken.json")
    assert isinstance(load_tokenizer(tmp_path), TekkenTokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ prompts

CFG = ImageConfig(longest_edge=256)


def _image(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_encode_prompt_layout(tiny_tok, rng):
    img = _image(rng, 48, 64)  # 3 x 4 patches
    ids, images = encode_prompt(["Look:", img, "What is it?"], tiny_tok, CFG)
    text_a, text_b = tiny_tok.encode("Look:"), tiny_tok.encode("What is it?")
    layout = image_token_layout(3, 4, 10, 12, 13)
    assert ids == [1] + text_a + layout + text_b
    assert layout[-1] == 13 and layout.count(12) == 2 and layout.count(10) == 12
    (patches, positions), = images
    want_patches, want_positions = patchify(preprocess_image(img, CFG))
    np.testing.assert_array_equal(patches, want_patches)
    np.testing.assert_array_equal(positions, want_positions)
    assert encode_prompt(["x"], tiny_tok, CFG, add_bos=False)[0] == tiny_tok.encode("x")
    with pytest.raises(TypeError, match="part 1"):
        encode_prompt(["x", 3], tiny_tok, CFG)


def test_prompt_batch_two_rows(tiny_tok, rng):
    img_a, img_b, img_c = _image(rng, 48, 64), _image(rng, 32, 32), _image(rng, 16, 48)
    row0 = encode_prompt(["Describe", img_a], tiny_tok, CFG)  # 12 patches
    row1 = encode_prompt([img_b, "and", img_c, "compare the two pictures in detail please"], tiny_tok, CFG)  # 4+3
    n0, n1 = len(row0[0]), len(row1[0])
    assert n0 != n1
    s = max(n0, n1) + 3
    batch = prompt_batch([row0, row1], seq_len=s, patch_budget=14, pad_id=tiny_tok.pad_id, image_id=tiny_tok.image_id)

    assert batch["tokens"].shape == (2, s) and batch["patches"].shape == (2, 14, 768)
    for b, n in enumerate((n0, n1)):
        assert (batch["tokens"][b, : s - n] == tiny_tok.pad_id).all()
        assert (batch["segment_ids"][b, : s - n] == 0).all() and (batch["segment_ids"][b, s - n:] == 1).all()
        np.testing.assert_array_equal(batch["positions"][b], np.r_[np.zeros(s - n), np.arange(n)])
        assert batch["tokens"][b, s - n:].tolist() == [row0, row1][b][0]
    np.testing.assert_array_equal(batch["patch_segment_ids"][0], [1] * 12 + [0] * 2)
    np.testing.assert_array_equal(batch["patch_segment_ids"][1], [1] * 4 + [2] * 3 + [0] * 7)
    for b, k in ((0, 12), (1, 7)):
        slots = batch["patch_token_index"][b, :k]
        assert (batch["tokens"][b, slots] == tiny_tok.image_id).all() and (np.diff(slots) > 0).all()
        assert (batch["patch_token_index"][b, k:] == s).all()
        assert (batch["patches"][b, k:] == 0).all()
    np.testing.assert_array_equal(batch["patch_positions"][1, 4:7], [[0, 0], [0, 1], [0, 2]])

    # The same batch through the HF-processor route (left padding via the attention mask).
    pixels = [preprocess_image(im, CFG) for im in (img_a, img_b, img_c)]
    pv = np.zeros((3, 3, 48, 64), np.float32)
    for i, p in enumerate(pixels):
        pv[i, :, : p.shape[0], : p.shape[1]] = p.transpose(2, 0, 1)
    ref = from_hf_inputs(batch["tokens"], pv, [p.shape[:2] for p in pixels], batch["segment_ids"],
                         image_token_id=tiny_tok.image_id, patch_budget=14, pad_id=tiny_tok.pad_id)
    for key, value in batch.items():
        np.testing.assert_array_equal(value, ref[key], err_msg=key)


def test_prompt_batch_defaults_and_text_only(tiny_tok):
    rows = [encode_prompt(["hi"], tiny_tok, CFG), encode_prompt(["a longer prompt here"], tiny_tok, CFG)]
    batch = prompt_batch(rows, pad_id=tiny_tok.pad_id, image_id=tiny_tok.image_id)
    assert batch["tokens"].shape[1] == len(rows[1][0])
    assert batch["patches"].shape == (2, 0, 768) and batch["patch_token_index"].shape == (2, 0)


def test_prompt_batch_errors(tiny_tok, rng):
    row = encode_prompt(["x", _image(rng, 32, 48)], tiny_tok, CFG)  # 6 patches
    n = len(row[0])
    kw = dict(pad_id=tiny_tok.pad_id, image_id=tiny_tok.image_id)
    with pytest.raises(ValueError, match=rf"prompt 0 has {n} tokens, 2 more than seq_len={n - 2}"):
        prompt_batch([row], seq_len=n - 2, **kw)
    with pytest.raises(ValueError, match="prompt 1 has 6 image patches, 1 more than patch_budget=5"):
        prompt_batch([encode_prompt(["y"], tiny_tok, CFG), row], patch_budget=5, **kw)
    with pytest.raises(ValueError, match=r"2 \[IMG\] tokens .* 6 patches"):
        prompt_batch([([1, 10, 10], row[1])], **kw)
    with pytest.raises(ValueError, match="at least one"):
        prompt_batch([], **kw)
    with pytest.raises(ValueError, match="empty"):
        prompt_batch([([], [])], **kw)
