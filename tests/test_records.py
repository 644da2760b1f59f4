"""RecordToDocument: text and chat records, image resolution, patch-budget policies, bad images, pipeline."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apriel_jax.data.errors import InvalidRecord
from apriel_jax.data.images import ImageConfig, ImageError, patch_grid, patchify, preprocess_image
from apriel_jax.data.packing import PackingConfig
from apriel_jax.data.pipeline import build_dataset
from apriel_jax.data.records import RecordToDocument, fit_longest_edge
from apriel_jax.data.sources import JsonlSource
from apriel_jax.data.tokenizer import train_tiny_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "apriel_jax" / "data" / "demo_data"
IMG, BREAK, END = 10, 12, 13  # Pixtral's ids; the tiny tokenizer and tekken share them


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    texts = [json.loads(line).get("text", line) for f in ("text", "chat_sft") for line in
             (DEMO / f"{f}.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tiny_tokenizer(texts, 600, path)
    return str(path)


def png_bytes(w=64, h=48, colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def image_record(part: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "Describe the image."}]},
                         {"role": "assistant", "content": "A red box."}], **extra}


def targets(doc, tok) -> str:
    return tok.decode(doc.tokens[doc.loss_mask > 0].tolist())


# --------------------------------------------------------------------------------------- text / chat


def test_text_record_is_bos_text_eos_all_targets(tok_path):
    conv = RecordToDocument(tok_path)
    doc = conv({"text": "Bread rises because yeast eats sugar."})
    tok = conv.tokenizer
    assert doc.tokens[0] == tok.bos_id and doc.tokens[-1] == tok.eos_id
    assert tok.decode(doc.tokens[1:-1].tolist()) == "Bread rises because yeast eats sugar."
    assert doc.loss_mask[0] == 0 and doc.loss_mask[1:].all()
    assert conv.records == 1 and conv.skips.total == 0


def test_chat_loss_modes(tok_path):
    record = {"messages": [{"role": "user", "content": "What is two plus two?"},
                           {"role": "assistant", "reasoning": "Add them.", "content": "Four."}]}
    responses = RecordToDocument(tok_path, loss="responses")(record)
    every = RecordToDocument(tok_path, loss="all")(record)
    np.testing.assert_array_equal(responses.tokens, every.tokens)
    tok = RecordToDocument(tok_path).tokenizer
    text = targets(responses, tok)
    assert "Four." in text and "Add them." in text and "two plus two" not in text
    assert every.loss_mask[0] == 0 and every.loss_mask[1:].all()
    assert responses.loss_mask.sum() < every.loss_mask.sum()


def test_tools_are_rendered(tok_path):
    record = json.loads((DEMO / "chat_sft.jsonl").read_text().splitlines()[16])
    assert record.get("tools")
    conv = RecordToDocument(tok_path)
    text = conv.tokenizer.decode(conv(record).tokens.tolist())
    assert "get_weather" in text and "<available_tools>" in text and "<tool_calls>" in text


# ------------------------------------------------------------------------------------------- images


def test_relative_path_and_base64_give_the_same_patches(tok_path, tmp_path):
    data = png_bytes()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(data)
    conv = RecordToDocument(tok_path)
    by_path = conv(image_record({"type": "image", "path": "img/a.png"}, _dir=str(tmp_path), _where="x:1"))
    by_image_key = conv(image_record({"type": "image", "image": "img/a.png"}, _dir=str(tmp_path)))
    inline = conv(image_record({"type": "image", "image_base64": base64.b64encode(data).decode()}))
    for doc in (by_path, by_image_key, inline):
        assert len(doc.images) == 1 and doc.images[0].num_patches == 4 * 3
        np.testing.assert_array_equal(doc.tokens, by_path.tokens)
        np.testing.assert_array_equal(doc.images[0].patches, by_path.images[0].patches)
        assert int((doc.tokens == IMG).sum()) == doc.num_patches
        assert doc.loss_mask[np.isin(doc.tokens, (IMG, BREAK, END))].sum() == 0


@pytest.mark.parametrize("size", [(640, 480), (333, 1000), (3000, 17), (97, 451)])
@pytest.mark.parametrize("budget", [1, 7, 100, 256])
def test_fit_longest_edge_is_the_largest_that_fits(size, budget):
    w, h = size
    cfg = ImageConfig()
    edge = fit_longest_edge(h, w, cfg, budget)
    count = lambda e: np.prod(patch_grid(h, w, dataclasses.replace(cfg, longest_edge=e)))  # noqa: E731
    assert count(edge) <= budget
    assert edge == cfg.longest_edge or count(edge + 1) > budget


def test_downscale_to_fit_exactly_fits_the_budget(tok_path):
    image = Image.new("RGB", (640, 480), (30, 90, 160))
    image.paste((250, 250, 0), (100, 100, 300, 200))
    budget = 100
    conv = RecordToDocument(tok_path, patch_budget=budget)
    doc = conv(image_record({"type": "image", "image": image}))
    assert conv.downscaled_images == 1
    (patches,) = doc.images
    # 4:3 at longest_edge 176 is a 9x11 grid (99 patches); one pixel more gives 9x12 = 108 > 100.
    assert patches.num_patches == 99 and patches.positions.max(axis=0).tolist() == [8, 10]
    # Pixel-identical to preprocessing the original at the chosen smaller longest_edge.
    small = ImageConfig(longest_edge=fit_longest_edge(480, 640, ImageConfig(), budget))
    expected, _ = patchify(preprocess_image(image, small))
    np.testing.assert_array_equal(patches.patches, expected)
    assert int((doc.tokens == IMG).sum()) == patches.num_patches


def test_image_within_budget_is_untouched(tok_path):
    conv = RecordToDocument(tok_path, patch_budget=12)
    doc = conv(image_record({"type": "image", "image": Image.new("RGB", (64, 48))}))
    assert conv.downscaled_images == 0 and doc.num_patches == 12


def test_oversize_skip_and_error(tok_path):
    record = image_record({"type": "image", "image": Image.new("RGB", (640, 480))}, _where="big.jsonl:4")
    skip = RecordToDocument(tok_path, patch_budget=64, oversize_images="skip")
    doc = skip(record)
    assert len(doc) == 0 and doc.skip_reason == "oversize_image"
    assert skip.skips.total == 1 and skip.skips.counts["oversize_image"] == 1
    with pytest.raises(ImageError, match=r"big\.jsonl:4.*patch budget 64"):
        RecordToDocument(tok_path, patch_budget=64, oversize_images="error")(record)


def test_corrupt_image_is_skipped_with_location(tok_path, tmp_path, caplog):
    (tmp_path / "bad.png").write_bytes(png_bytes()[:40])  # truncated PNG
    lines = [{"text": "fine"}, image_record({"type": "image", "path": "bad.png"}),
             image_record({"type": "image", "image_base64": "not base64!"}),
             image_record({"type": "image", "path": "missing.png"})]
    src = JsonlSource(_write(tmp_path / "data.jsonl", lines))
    conv = RecordToDocument(tok_path)
    with caplog.at_level(logging.WARNING, logger="apriel_jax.data.validate"):
        docs = [conv(src[i]) for i in range(len(src))]
    assert len(docs[0]) > 0 and [len(d) for d in docs[1:]] == [0, 0, 0]
    assert [d.skip_reason for d in docs] == ["", "bad_image", "bad_image", "unreadable_image"]
    assert conv.skips.total == 3 and conv.records == 4
    for line in (2, 3, 4):
        assert f"data.jsonl:{line}" in caplog.text

    strict = RecordToDocument(tok_path, on_invalid="error")
    with pytest.raises(InvalidRecord, match=r"data\.jsonl:2: .*cannot decode.*\[bad_image\]$"):
        strict(src[1])


def test_synthetic_task_samples_convert(tok_path):
    from apriel_jax.data.synthetic import TaskMixture

    conv = RecordToDocument(tok_path, patch_budget=256)
    mixture = TaskMixture(seed=1, length=8, size=(320, 320))
    for i in range(len(mixture)):
        doc = conv(mixture[i])
        assert len(doc.images) == 1 and 0 < doc.num_patches <= 256
        assert int((doc.tokens == IMG).sum()) == doc.num_patches
        assert doc.loss_mask.sum() > 0
    assert conv.downscaled_images == 8  # 20x20 = 400 patches each, over the budget


def test_pickles_without_the_tokenizer(tok_path):
    conv = RecordToDocument(tok_path)
    conv({"text": "load it"})
    assert conv._tokenizer is not None
    clone = pickle.loads(pickle.dumps(conv))
    assert clone._tokenizer is None
    np.testing.assert_array_equal(clone({"text": "same"}).tokens, conv({"text": "same"}).tokens)


def test_bad_options():
    with pytest.raises(ValueError, match="loss"):
        RecordToDocument("x", loss="some")
    with pytest.raises(ValueError, match="oversize"):
        RecordToDocument("x", oversize_images="crop")
    with pytest.raises(ValueError, match="on_invalid"):
        RecordToDocument("x", on_invalid="ignore")
    with pytest.raises(ValueError, match="mode"):
        RecordToDocument("x", mode="chatml")


# ----------------------------------------------------------------------------------- real tokenizer


def test_pixtral_tekken_on_a_demo_record():
    record = JsonlSource(DEMO / "multimodal.jsonl")[4]  # the 128x128 checkerboard
    conv = RecordToDocument("pixtral", patch_budget=256)
    doc = conv(record)
    assert doc.num_patches == 64
    assert int((doc.tokens == conv.tokenizer.image_id).sum()) == 64
    assert int((doc.tokens == conv.tokenizer.image_break_id).sum()) == 7
    assert "checkerboard" in targets(doc, conv.tokenizer)


# --------------------------------------------------------------------------------------- end to end


def test_pipeline_on_demo_data(tok_path):
    conv = RecordToDocument(tok_path, patch_budget=256)
    tok = conv.tokenizer
    cfg = PackingConfig(seq_len=1024, patch_budget=256, pad_id=tok.pad_id)
    sources = {name: (JsonlSource(DEMO / f"{name}.jsonl"), w)
               for name, w in (("text", 0.3), ("chat_sft", 0.3), ("multimodal", 0.4))}
    it = iter(build_dataset(sources, conv, cfg, global_batch=2, seed=0))
    batches = [next(it) for _ in range(4)]
    images = 0
    for b in batches:
        assert b["tokens"].shape == (2, 1024) and b["patches"].shape == (2, 256, 768)
        for r in range(2):
            slots = b["patch_token_index"][r]
            real = slots < 1024
            # Every [IMG] token has exactly one patch, and every real patch points at an [IMG] token.
            assert int((b["tokens"][r] == IMG).sum()) == int(real.sum())
            assert (b["tokens"][r][slots[real]] == IMG).all()
            images += len(set(b["patch_segment_ids"][r][real].tolist()))
    assert images > 0
    assert it.stats.packing.tokens > 0 and it.stats.proportions()["multimodal"] > 0


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
