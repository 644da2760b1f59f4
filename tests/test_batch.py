"""The batch contract: one declaration (README table included), one assembler, chex checks at the boundary."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from apriel_jax.data.batch import FIELDS, LABELS, BatchAssembler
from apriel_jax.data.batch_check import check_batch, check_batch_in_debug
from apriel_jax.data.hf_inputs import from_hf_inputs
from apriel_jax.data.images import image_token_layout
from apriel_jax.data.packing import PackingConfig, pack_documents, rows_to_batch
from apriel_jax.data.prompt import prompt_batch
from apriel_jax.data.types import Document, ImagePatches
from apriel_jax.model.generate import generate
from apriel_jax.storage.errors import DEBUG_ENV

IMG, BRK, END, PAD = 10, 12, 13, 0


def _image(rng, rows, cols, dim=768):
    positions = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return ImagePatches(rng.standard_normal((rows * cols, dim)).astype(np.float32), positions.astype(np.int32))


def _ids_with_image(rows, cols):
    return [1, 20, 21] + image_token_layout(rows, cols, IMG, BRK, END) + [22]


def test_readme_table_is_the_declaration():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## The batch contract", 1)[1].split("\n## ", 1)[0]
    table = dict(re.findall(r"^\| `(\w+)` \| (\[[^]]*\] \w+) \|", section, re.M))
    declared = {name: f"[{', '.join('768' if d == 'D' else d for d in spec.dims)}] {spec.dtype.__name__}"
                for name, spec in FIELDS.items()}
    assert table == declared


def test_every_assembler_route_meets_the_contract(rng):
    cfg = PackingConfig(seq_len=64, patch_budget=16)
    docs = [Document(ids, np.ones(len(ids), np.float32), [_image(rng, 2, 3)])
            for ids in (_ids_with_image(2, 3), _ids_with_image(2, 3))]
    docs.append(Document(np.arange(20, 50), np.ones(30, np.float32)))
    check_batch(rows_to_batch(pack_documents(docs, cfg)[0], cfg), labels=True)

    prompts = [(_ids_with_image(2, 3), [_image(rng, 2, 3)]), ([1, 20, 21], [])]
    generation = prompt_batch(prompts, patch_budget=8, pad_id=PAD, image_id=IMG)
    assert not set(LABELS) & set(generation)
    check_batch(generation, labels=False)

    hf = from_hf_inputs(generation["tokens"], np.zeros((1, 3, 32, 48), np.float32), [(32, 48)],
                        generation["segment_ids"], image_token_id=IMG, patch_budget=8, pad_id=PAD)
    check_batch(hf, labels=True)


def test_assembler_numbers_images_per_row_across_calls(rng):
    assembler = BatchAssembler(2, 10, 6, 768, pad_id=PAD)
    assembler.add_images(1, [_image(rng, 1, 2)], np.array([1, 2]))
    assembler.add_images(1, [_image(rng, 1, 1), _image(rng, 1, 1)], np.array([5, 7]))
    batch = assembler.batch()
    np.testing.assert_array_equal(batch["patch_segment_ids"], [[0] * 6, [1, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(batch["patch_token_index"], [[10] * 6, [1, 2, 5, 7, 10, 10]])
    with pytest.raises(ValueError, match="3 \\[IMG\\] slots for 2 patches"):
        assembler.add_images(0, [_image(rng, 1, 2)], np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="needs 8 patches; the patch budget is 6"):
        assembler.add_images(1, [_image(rng, 2, 2)], np.arange(4))


def _good_batch(rng):
    return prompt_batch([(_ids_with_image(1, 2), [_image(rng, 1, 2)])], pad_id=PAD, image_id=IMG)


@pytest.mark.parametrize("break_it, message", [
    (lambda b: b.update(tokens=b["tokens"].astype(np.int64)), "int64.*'tokens'"),
    (lambda b: b.update(positions=b["positions"][:, :-1]), "shape.*'positions'"),
    (lambda b: b.update(patch_token_index=b["patch_token_index"][:, :1]), "shape.*'patch_token_index'"),
    (lambda b: b.pop("patch_positions"), "lacks.*patch_positions"),
    (lambda b: b.update(loss_mask=np.zeros(b["tokens"].shape, np.int32)), "int32.*'loss_mask'"),
])
def test_check_batch_names_the_broken_field(rng, break_it, message):
    batch = dict(_good_batch(rng))
    check_batch(batch, labels=False)
    break_it(batch)
    with pytest.raises(AssertionError, match=message):
        check_batch(batch, labels=False)


def test_labels_are_required_for_training_and_patches_are_optional(rng):
    text_only = {k: v for k, v in _good_batch(rng).items() if not k.startswith("patch")}
    check_batch(text_only, labels=False)
    with pytest.raises(AssertionError, match="lacks.*targets.*loss_mask"):
        check_batch(text_only, labels=True)


def test_generate_checks_its_batch_only_in_debug_mode(rng, monkeypatch):
    broken = dict(_good_batch(rng), tokens=np.zeros((1, 3), np.int64))
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    check_batch_in_debug(broken, labels=False)  # no check, no cost outside debug mode
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(AssertionError, match="'tokens'"):
        generate(None, broken)  # rejected at the boundary, before the model is touched
