import numpy as np
import pytest

from apriel_jax.data import from_hf_inputs
from apriel_jax.data.images import ImageConfig, image_token_layout, patchify, preprocess_image

IMG, BRK, END, BOS, PAD = 10, 11, 12, 1, 0
KEYS = {
    "tokens": ((), np.int32),
    "targets": ((), np.int32),
    "loss_mask": ((), np.float32),
    "segment_ids": ((), np.int32),
    "positions": ((), np.int32),
    "patches": ((768,), np.float32),
    "patch_positions": ((2,), np.int32),
    "patch_segment_ids": ((), np.int32),
    "patch_token_index": ((), np.int32),
}


def _layout(h_px, w_px):
    return image_token_layout(h_px // 16, w_px // 16, IMG, BRK, END)


def _example(seed=0):
    """Two rows: row 0 holds a 32x48 and a 16x16 image, row 1 a 48x32 image, left-padded by 3."""
    rng = np.random.default_rng(seed)
    sizes = [(32, 48), (16, 16), (48, 32)]
    images = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in sizes]

    row0 = [BOS, 21] + _layout(32, 48) + [22] + _layout(16, 16) + [23, 24]
    row1 = [BOS, 25] + _layout(48, 32) + [26]
    assert len(row0) == 15 and len(row1) == 12
    pad = len(row0) - len(row1)
    input_ids = np.array([row0, [PAD] * pad + row1], dtype=np.int64)
    attention_mask = np.array([[1] * 15, [0] * pad + [1] * 12], dtype=np.int64)

    # HF pads every image bottom/right with zeros to the batch max, channel-first.
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixel_values = np.zeros((3, 3, hmax, wmax), dtype=np.float32)
    for i, img in enumerate(images):
        pixel_values[i, :, : img.shape[0], : img.shape[1]] = img.transpose(2, 0, 1)
    image_sizes = np.array(sizes, dtype=np.int64)
    return input_ids, attention_mask, pixel_values, image_sizes, images


def _check_shapes(out, batch, seq, budget):
    assert set(out) == set(KEYS)
    for key, (tail, dtype) in KEYS.items():
        lead = (batch, budget) if key.startswith("patch") else (batch, seq)
        assert out[key].shape == lead + tail, key
        assert out[key].dtype == dtype, key


def test_patches_land_on_img_tokens():
    input_ids, attention_mask, pixel_values, image_sizes, images = _example()
    out = from_hf_inputs(input_ids, pixel_values, image_sizes, attention_mask, image_token_id=IMG)
    _check_shapes(out, 2, 15, 7)  # budget defaults to the fullest row: 6 + 1 patches

    p0, pos0 = patchify(images[0])
    p1, pos1 = patchify(images[1])
    p2, pos2 = patchify(images[2])

    # Row 0: first image (2x3), then the 1x1 image.
    np.testing.assert_array_equal(out["patches"][0, :6], p0)
    np.testing.assert_array_equal(out["patches"][0, 6], p1[0])
    np.testing.assert_array_equal(out["patch_token_index"][0], [2, 3, 4, 6, 7, 8, 11])
    np.testing.assert_array_equal(out["patch_positions"][0], np.concatenate([pos0, pos1]))
    np.testing.assert_array_equal(
        out["patch_positions"][0], [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [0, 0]]
    )
    np.testing.assert_array_equal(out["patch_segment_ids"][0], [1, 1, 1, 1, 1, 1, 2])

    # Row 1: 3x2 image shifted by the 3 left-padding slots, then one padding patch.
    np.testing.assert_array_equal(out["patches"][1, :6], p2)
    np.testing.assert_array_equal(out["patch_token_index"][1], [5, 6, 8, 9, 11, 12, 15])
    np.testing.assert_array_equal(out["patch_positions"][1, :6], pos2)
    np.testing.assert_array_equal(out["patch_positions"][1, :6], [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]])
    np.testing.assert_array_equal(out["patch_segment_ids"][1], [1, 1, 1, 1, 1, 1, 0])
    # Padding patch conventions.
    assert not out["patches"][1, 6].any()
    np.testing.assert_array_equal(out["patch_positions"][1, 6], [0, 0])

    # Every real patch points at an [IMG] token, and every [IMG] token gets exactly one patch.
    for b in range(2):
        real = out["patch_segment_ids"][b] > 0
        idx = out["patch_token_index"][b][real]
        assert (out["tokens"][b, idx] == IMG).all()
        np.testing.assert_array_equal(np.sort(idx), np.flatnonzero(out["tokens"][b] == IMG))


def test_text_fields_and_padding():
    input_ids, attention_mask, pixel_values, image_sizes, _ = _example()
    out = from_hf_inputs(input_ids, pixel_values, image_sizes, attention_mask, image_token_id=IMG, pad_id=PAD)

    np.testing.assert_array_equal(out["tokens"], input_ids)
    np.testing.assert_array_equal(out["segment_ids"], attention_mask)
    np.testing.assert_array_equal(out["positions"][0], np.arange(15))
    np.testing.assert_array_equal(out["positions"][1], [0, 0, 0] + list(range(12)))

    np.testing.assert_array_equal(out["targets"][:, :-1], input_ids[:, 1:])
    np.testing.assert_array_equal(out["targets"][:, -1], [PAD, PAD])

    # Loss counts where both the token and its target are real and the target is not [IMG].
    expected = np.zeros((2, 15), dtype=np.float32)
    for b in range(2):
        for t in range(14):
            if attention_mask[b, t] and attention_mask[b, t + 1] and input_ids[b, t + 1] != IMG:
                expected[b, t] = 1.0
    np.testing.assert_array_equal(out["loss_mask"], expected)
    # Spot checks that pin the semantics independent of the loop above.
    assert out["loss_mask"][0, 0] == 1  # BOS -> text
    assert out["loss_mask"][0, 1] == 0  # text -> [IMG]
    assert out["loss_mask"][0, 4] == 1  # [IMG] -> [IMG_BREAK] is still predicted
    assert out["loss_mask"][0, 14] == 0  # last position has no target
    assert out["loss_mask"][1, :3].sum() == 0  # padding (incl. pad -> BOS)
    assert out["loss_mask"][1, 3] == 1  # BOS -> text in the padded row
    assert out["loss_mask"][1, 4] == 0  # text -> [IMG]


def test_seq_len_and_patch_budget_padding():
    input_ids, attention_mask, pixel_values, image_sizes, _ = _example()
    base = from_hf_inputs(input_ids, pixel_values, image_sizes, attention_mask, image_token_id=IMG)
    out = from_hf_inputs(
        input_ids, pixel_values, image_sizes, attention_mask, image_token_id=IMG, seq_len=20, patch_budget=9, pad_id=7
    )
    _check_shapes(out, 2, 20, 9)
    np.testing.assert_array_equal(out["tokens"][:, :15], input_ids)
    assert (out["tokens"][:, 15:] == 7).all()
    assert (out["segment_ids"][:, 15:] == 0).all()
    assert (out["positions"][:, 15:] == 0).all()
    assert (out["loss_mask"][:, 14:] == 0).all()
    np.testing.assert_array_equal(out["loss_mask"][:, :14], base["loss_mask"][:, :14])
    np.testing.assert_array_equal(out["patches"][:, :7], base["patches"])
    assert not out["patches"][:, 7:].any()
    # Padding patches point one past the (new) sequence end.
    np.testing.assert_array_equal(out["patch_token_index"][0], [2, 3, 4, 6, 7, 8, 11, 20, 20])
    np.testing.assert_array_equal(out["patch_token_index"][1], [5, 6, 8, 9, 11, 12, 20, 20, 20])
    assert (out["patch_segment_ids"][:, 7:] == 0).all()

    with pytest.raises(ValueError, match="seq_len"):
        from_hf_inputs(input_ids, pixel_values, image_sizes, attention_mask, image_token_id=IMG, seq_len=14)
    with pytest.raises(ValueError, match="patch_budget"):
        from_hf_inputs(input_ids, pixel_values, image_sizes, attention_mask, image_token_id=IMG, patch_budget=6)


def test_torch_tensors_and_lists_are_accepted():
    torch = pytest.importorskip("torch")
    input_ids, attention_mask, pixel_values, image_sizes, images = _example(seed=3)
    ref = from_hf_inputs(input_ids, pixel_values, image_sizes, attention_mask, image_token_id=IMG)

    out = from_hf_inputs(
        torch.from_numpy(input_ids),
        torch.from_numpy(pixel_values),
        torch.from_numpy(image_sizes),
        torch.from_numpy(attention_mask),
        image_token_id=IMG,
    )
    for key in ref:
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)

    # Per-image channel-first list without image_sizes: sizes come from the arrays.
    listed = [torch.from_numpy(img.transpose(2, 0, 1).copy()) for img in images]
    out = from_hf_inputs(input_ids, listed, None, attention_mask, image_token_id=IMG)
    for key in ref:
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)

    # bfloat16 tensors have no numpy dtype; they must still convert.
    out = from_hf_inputs(
        input_ids, torch.from_numpy(pixel_values).to(torch.bfloat16), image_sizes, attention_mask, image_token_id=IMG
    )
    np.testing.assert_allclose(out["patches"], ref["patches"], rtol=1e-2, atol=1e-2)
    assert out["patches"].dtype == np.float32


def test_mismatched_counts_raise():
    input_ids, attention_mask, pixel_values, image_sizes, _ = _example()

    fewer = input_ids.copy()
    fewer[0, 2] = 30  # one [IMG] token turned into text
    with pytest.raises(ValueError, match=r"12 image tokens.*13 patches"):
        from_hf_inputs(fewer, pixel_values, image_sizes, attention_mask, image_token_id=IMG)

    with pytest.raises(ValueError, match=r"13 image tokens.*7 patches"):
        from_hf_inputs(input_ids, pixel_values[:2], image_sizes[:2], attention_mask, image_token_id=IMG)

    # Same totals, wrong order: row 0 would need part of the 3x2 image.
    order = [2, 0, 1]
    with pytest.raises(ValueError, match="row 0 has 7 image tokens"):
        from_hf_inputs(input_ids, pixel_values[order], image_sizes[order], attention_mask, image_token_id=IMG)

    with pytest.raises(ValueError, match="image_sizes has 2 entries"):
        from_hf_inputs(input_ids, pixel_values, image_sizes[:2], attention_mask, image_token_id=IMG)

    bad_sizes = image_sizes.copy()
    bad_sizes[1] = (16, 20)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        from_hf_inputs(input_ids, pixel_values, bad_sizes, attention_mask, image_token_id=IMG)

    with pytest.raises(ValueError, match="attention_mask shape"):
        from_hf_inputs(input_ids, pixel_values, image_sizes, attention_mask[:, :5], image_token_id=IMG)


def test_text_only_batch():
    ids = np.array([[BOS, 5, 6, 7], [PAD, BOS, 8, 9]])
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])
    out = from_hf_inputs(ids, attention_mask=mask, image_token_id=IMG, patch_budget=3)
    _check_shapes(out, 2, 4, 3)
    assert not out["patches"].any()
    assert (out["patch_token_index"] == 4).all()
    assert (out["patch_segment_ids"] == 0).all()
    np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 1, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3], [0, 0, 1, 2]])

    out = from_hf_inputs(ids, image_token_id=IMG)  # no mask: every token is real
    np.testing.assert_array_equal(out["segment_ids"], np.ones((2, 4)))
    assert out["patches"].shape == (2, 0, 768)

    with pytest.raises(ValueError, match=r"2 image tokens.*1 patches"):
        from_hf_inputs(np.array([[IMG, IMG]]), np.zeros((1, 3, 16, 16), np.float32), image_token_id=IMG)


def test_end_to_end_with_hf_processor():
    pytest.importorskip("transformers")
    from PIL import Image

    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    rng = np.random.default_rng(21)
    pil_images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(70, 33), (20, 90), (41, 41)]
    ]
    cfg = ImageConfig(longest_edge=64)
    hf = PixtralImageProcessorPil(size={"longest_edge": 64})(pil_images, return_tensors="np")
    sizes = np.asarray(hf["image_sizes"])

    # Row 0: images 0 and 1; row 1: image 2, left padded to the same length.
    rows = [[BOS, 40], [BOS, 41]]
    for img_idx, row in [(0, 0), (1, 0), (2, 1)]:
        rows[row] += _layout(*sizes[img_idx]) + [42]
    length = max(map(len, rows))
    ids = np.array([[PAD] * (length - len(r)) + r for r in rows])
    mask = (np.arange(length)[None] >= (length - np.array([len(r) for r in rows]))[:, None]).astype(np.int64)

    out = from_hf_inputs(ids, hf["pixel_values"], sizes, mask, image_token_id=IMG, seq_len=length + 4)
    ours = [patchify(preprocess_image(im, cfg))[0] for im in pil_images]
    n0, n1 = len(ours[0]), len(ours[1])
    np.testing.assert_allclose(out["patches"][0, :n0], ours[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["patches"][0, n0 : n0 + n1], ours[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["patches"][1, : len(ours[2])], ours[2], atol=1e-5, rtol=0)
    for b in range(2):
        real = out["patch_segment_ids"][b] > 0
        assert (out["tokens"][b, out["patch_token_index"][b][real]] == IMG).all()
        assert (out["patch_token_index"][b][~real] == length + 4).all()
