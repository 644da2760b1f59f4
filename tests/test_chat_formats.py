"""The chat formats users bring (LLaVA/ShareGPT, OpenAI image_url parts, <image> placeholders) give exactly the
Document of the equivalent native record: same tokens, loss mask and patches, with the Pixtral tokenizer."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apriel_jax.data.columns import Columns, row_to_record
from apriel_jax.data.errors import InvalidRecord
from apriel_jax.data.formats import to_native
from apriel_jax.data.records import RecordToDocument
from apriel_jax.data.sources import ArrayRecordSource, JsonlSource, array_record_paths, prepare_array_record


def _png(size, colour) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (0, 0, size[0] // 2, size[1] // 3))  # not uniform: patches differ by position
    image.save(buf, format="PNG")
    return buf.getvalue()


A_PNG, B_PNG = _png((64, 48), (200, 40, 40)), _png((40, 80), (20, 90, 160))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    (root / "imgs").mkdir()
    (root / "imgs" / "a.png").write_bytes(A_PNG)
    (root / "imgs" / "b.png").write_bytes(B_PNG)
    return root


@pytest.fixture(scope="module")
def pixtral():
    return {mode: RecordToDocument("pixtral", mode=mode, patch_budget=256, on_invalid="error")
            for mode in ("apriel", "mistral_instruct")}


def _read(folder: Path, *records) -> list[dict]:
    """The records as a JSONL source reads them (with "_dir" and "_where"), from one file."""
    path = folder / f"records-{abs(hash(json.dumps(records, sort_keys=True)))}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    src = JsonlSource(path)
    return [src[i] for i in range(len(src))]


def assert_same_document(converted, native, images: int):
    assert not converted.skip_reason and len(converted) > 0
    np.testing.assert_array_equal(converted.tokens, native.tokens)
    np.testing.assert_array_equal(converted.loss_mask, native.loss_mask)
    assert len(converted.images) == len(native.images) == images
    for x, y in zip(converted.images, native.images):
        np.testing.assert_array_equal(x.patches, y.patches)
        np.testing.assert_array_equal(x.positions, y.positions)


def _decoded(conv, doc) -> str:
    return conv.tokenizer.decode(doc.tokens.tolist())


# --------------------------------------------------------------------------------------- LLaVA / ShareGPT


@pytest.mark.parametrize("mode", ["apriel", "mistral_instruct"])
def test_llava_record_equals_the_native_record(folder, pixtral, mode):
    llava = {"id": "000001", "image": "imgs/a.png", "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "A red box."},
        {"from": "human", "value": "And its colour?"},
        {"from": "gpt", "value": "Red."}]}
    native = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "path": "imgs/a.png"},
                                     {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": "A red box."},
        {"role": "user", "content": "And its colour?"},  # a turn without placeholder stays a string
        {"role": "assistant", "content": "Red."}]}
    conv = pixtral[mode]
    converted, expected = (conv(r) for r in _read(folder, llava, native))
    assert_same_document(converted, expected, images=1)
    assert "<image>" not in _decoded(conv, converted) and "What is shown?" in _decoded(conv, converted)


def test_sharegpt_images_list_fills_the_placeholders_in_order(folder, pixtral):
    sharegpt = {"images": ["imgs/a.png", "imgs/b.png"], "conversations": [
        {"from": "human", "value": "Compare <image> and\n<image>\nWhich is taller?"},
        {"from": "gpt", "value": "The second."}]}
    native = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "path": "imgs/a.png"},
                                     {"type": "text", "text": " and"}, {"type": "image", "path": "imgs/b.png"},
                                     {"type": "text", "text": "Which is taller?"}]},
        {"role": "assistant", "content": "The second."}]}
    swapped = {**sharegpt, "images": ["imgs/b.png", "imgs/a.png"]}
    converted, expected, other = (pixtral["apriel"](r) for r in _read(folder, sharegpt, native, swapped))
    assert_same_document(converted, expected, images=2)
    assert not np.array_equal(other.tokens, expected.tokens)  # the order of the images is kept


def test_role_content_turns_in_conversations_are_taken_as_they_are(folder, pixtral):
    mixed = {"image": "imgs/b.png", "conversations": [{"role": "user", "content": "<image>"},
                                                      {"from": "GPT", "value": "Blue."}]}
    native = {"messages": [{"role": "user", "content": [{"type": "image", "path": "imgs/b.png"}]},
                           {"role": "assistant", "content": "Blue."}]}
    assert_same_document(*(pixtral["apriel"](r) for r in _read(folder, mixed, native)), images=1)


# ----------------------------------------------------------------------------------------------- OpenAI


@pytest.mark.parametrize("url", ["imgs/b.png", "file://{folder}/imgs/b.png", "data:image/png;base64,{b64}"])
def test_openai_image_url_parts_equal_the_native_record(folder, pixtral, url):
    url = url.format(folder=folder, b64=base64.b64encode(B_PNG).decode())
    openai = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be exact."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"},
                                     {"type": "image_url", "image_url": {"url": url, "detail": "high"}}]},
        {"role": "assistant", "content": "Blue."}]}
    native = {"messages": [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"},
                                     {"type": "image", "path": "imgs/b.png"}]},
        {"role": "assistant", "content": "Blue."}]}
    assert_same_document(*(pixtral["apriel"](r) for r in _read(folder, openai, native)), images=1)


@pytest.mark.parametrize("url", ["https://example.org/cat.png", "HTTP://example.org/cat.png"])
def test_remote_image_urls_are_refused(url):
    record = {"_where": "chats.jsonl:3", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
        {"role": "assistant", "content": "A cat."}]}
    with pytest.raises(InvalidRecord, match=r"^chats\.jsonl:3: message 0, part 0 is a remote URL .*nothing is "
                                            r"fetched at training time.*\[remote_image_url\]$"):
        to_native(record)
    with pytest.raises(InvalidRecord, match=r"\[remote_image_url\]$"):  # as an entry of "images" too
        to_native({"messages": [{"role": "user", "content": "<image>"}], "images": [url]})


# ------------------------------------------------------------------------------------ <image> placeholders


def test_messages_with_placeholders_and_an_images_list(folder, pixtral):
    placeholders = {"messages": [{"role": "user", "content": "<image>\nDescribe it."},
                                 {"role": "assistant", "content": "A red box."}], "images": ["imgs/a.png"]}
    as_parts = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
                             {"role": "assistant", "content": "A red box."}], "images": [{"path": "imgs/a.png"}]}
    native = {"messages": [{"role": "user", "content": [{"type": "image", "path": "imgs/a.png"},
                                                        {"type": "text", "text": "Describe it."}]},
                           {"role": "assistant", "content": "A red box."}]}
    docs = [pixtral["apriel"](r) for r in _read(folder, placeholders, as_parts, native)]
    assert_same_document(docs[0], docs[2], images=1)
    assert_same_document(docs[1], docs[2], images=1)
    # In memory (a Hugging Face dataset row): image bytes, in the {"bytes", "path"} layout.
    in_memory = {**placeholders, "images": [{"bytes": A_PNG, "path": "original-name.png"}]}
    assert_same_document(pixtral["apriel"](in_memory), docs[2], images=1)


@pytest.mark.parametrize("content, images, counts", [
    ("<image> and <image>: same?", ["imgs/a.png"], "2 image placeholders .* 1 images"),
    ("Describe the picture.", ["imgs/a.png"], "0 image placeholders .* 1 images"),
    ("<image> what is it?", None, "1 image placeholders .* 0 images"),
])
def test_placeholders_and_images_must_match_in_number(content, images, counts):
    record = {"_where": "d.jsonl:9", "messages": [{"role": "user", "content": content},
                                                 {"role": "assistant", "content": "ok"}]}
    if images is not None:
        record["images"] = images
    with pytest.raises(InvalidRecord, match=rf"^d\.jsonl:9: the chat has {counts} \[image_count_mismatch\]$"):
        to_native(record)


@pytest.mark.parametrize("text, parts", [
    ("<image>\nQ", ["IMG", "Q"]),
    ("Q\n<image>", ["Q", "IMG"]),
    ("a <image> b", ["a ", "IMG", " b"]),
    ("<image>\n\nQ\n", ["IMG", "\nQ\n"]),  # one separating newline goes, the rest of the text stays
    ("<image><image>", ["IMG", "IMG"]),
])
def test_placeholders_split_the_text_exactly(text, parts):
    record = to_native({"messages": [{"role": "user", "content": text}], "images": ["x.png"] * parts.count("IMG")})
    got = ["IMG" if p["type"] == "image" else p["text"] for p in record["messages"][0]["content"]]
    assert got == parts
    plain = {"messages": [{"role": "user", "content": "no placeholder\n"}]}
    assert to_native(plain) == plain  # native records pass unchanged


@pytest.mark.parametrize("record, message", [
    ({"conversations": "hi"}, r"'conversations' must be a list of turns, got 'hi' \(str\)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     r"conversations\[1\]: 'from' must be one of .*got 'bot' \(str\)"),
    ({"conversations": [{"from": "human"}]}, r"conversations\[0\] has no 'value'"),
    ({"conversations": [], "messages": []}, "a record has 'messages' or 'conversations', not both"),
    ({"messages": [{"role": "user", "content": "<image>"}], "images": ["a.png"], "image": "b.png"},
     "a record has 'images' or 'image', not both"),
    ({"text": "a caption", "images": ["a.png"]}, "a text record cannot hold images"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     r"message 0, part 0: an image_url part needs"),
    ({"messages": [{"role": "user", "content": "<image>"}], "images": [7]}, r"image 0 must be a path, .*got 7 \(int\)"),
])
def test_malformed_foreign_records_name_what_is_wrong(record, message):
    with pytest.raises(InvalidRecord, match=rf"^x\.jsonl:1: {message}.* \[bad_schema\]$"):
        to_native({**record, "_where": "x.jsonl:1"})


# ------------------------------------------------------------------------------ tables and prepared shards


def test_a_table_row_with_placeholders_in_its_text(pixtral):
    row = {"messages": [{"role": "user", "content": "<image>\nWhat is it?"},
                        {"role": "assistant", "content": "A box."}],
           "images": [{"bytes": A_PNG, "path": None}]}
    native = {"messages": [{"role": "user", "content": [{"type": "image", "image": A_PNG},
                                                        {"type": "text", "text": "What is it?"}]},
                           {"role": "assistant", "content": "A box."}]}
    converted = pixtral["apriel"](row_to_record(row, "t.parquet:row 0", Columns()))
    assert_same_document(converted, pixtral["apriel"](native), images=1)


def test_prepare_stores_converted_records_that_train_the_same(folder, pixtral, tmp_path):
    records = [
        {"image": "imgs/a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                  {"from": "gpt", "value": "Red."}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/b.png"}},
                                                   {"type": "text", "text": "And this?"}]},
                      {"role": "assistant", "content": "Blue."}]},
    ]
    (folder / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = prepare_array_record(str(folder / "mixed.jsonl"), str(tmp_path / "ar"), on_invalid="error")
    assert manifest["records"] == 2 and manifest["skipped"] == 0
    shards = ArrayRecordSource(array_record_paths(str(tmp_path / "ar")))
    stored = [shards[i] for i in range(2)]
    assert all("conversations" not in r and "images" not in r and "image" not in r for r in stored)
    parts = [p for r in stored for p in r["messages"][0]["content"] if p["type"] == "image"]
    assert [base64.b64decode(p["image_base64"]) for p in parts] == [A_PNG, B_PNG]
    from_jsonl = [pixtral["apriel"](r) for r in JsonlSource(folder / "mixed.jsonl")]
    for doc, expected in zip((pixtral["apriel"](r) for r in stored), from_jsonl):
        assert_same_document(doc, expected, images=1)
