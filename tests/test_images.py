import io

import numpy as np
import pytest
from PIL import ExifTags, Image

from apriel_jax.data.images import (
    ImageConfig,
    ImageError,
    image_token_layout,
    load_image,
    patch_grid,
    patchify,
    preprocess_image,
    resized_size,
)

MEAN = np.array(ImageConfig().mean, dtype=np.float32)
STD = np.array(ImageConfig().std, dtype=np.float32)


def _hf_processor(longest_edge):
    transformers = pytest.importorskip("transformers")
    # Pin the PIL backend: it is what `PixtralImageProcessor` resolves to when
    # torchvision is absent (as here), and the torchvision backend resizes with
    # different numerics, so pinning keeps the reference stable.
    try:
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil as Proc
    except ImportError:  # older transformers: the slow processor is PIL-based
        Proc = transformers.PixtralImageProcessor
    return Proc(size={"longest_edge": longest_edge}, patch_size={"height": 16, "width": 16})


def _random_image(rng, height, width, mode):
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4, "P": 1}[mode]
    # Noise plus a gradient so the bicubic kernel sees both sharp edges
    # (overshoot -> uint8 clipping) and smooth regions.
    noise = rng.integers(0, 256, (height, width, channels))
    ramp = np.linspace(0, 255, width)[None, :, None]
    pixels = ((noise + ramp) / 2).astype(np.uint8)
    if mode == "P":
        img = Image.fromarray(pixels[..., 0], mode="L").convert("P")
        img.info["transparency"] = int(pixels[0, 0, 0])
        return img
    if channels == 1:
        return Image.fromarray(pixels[..., 0], mode="L")
    return Image.fromarray(pixels, mode=mode)


IMAGE_CASES = [
    (37, 53, "RGB"),
    (300, 17, "RGB"),
    (1100, 700, "RGB"),  # downscaled even at the default longest edge
    (45, 61, "RGBA"),
    (129, 66, "L"),
    (50, 60, "LA"),
    (31, 47, "P"),  # palette with a transparent index
    (40, 24, "CMYK"),
]


@pytest.mark.parametrize("longest_edge", [1024, 64])
def test_matches_hf_pixtral_processor(longest_edge):
    rng = np.random.default_rng(1234 + longest_edge)
    images = [_random_image(rng, h, w, mode) for h, w, mode in IMAGE_CASES]
    proc = _hf_processor(longest_edge)
    # One batched call so HF pads to the batch max and we exercise cropping by image_sizes.
    out = proc(images, return_tensors="np")
    pixel_values = np.asarray(out["pixel_values"])
    image_sizes = np.asarray(out["image_sizes"])
    assert pixel_values.shape[0] == len(images)

    cfg = ImageConfig(longest_edge=longest_edge)
    worst = 0.0
    for i, img in enumerate(images):
        h, w = (int(v) for v in image_sizes[i])
        ref_hwc = pixel_values[i, :, :h, :w].transpose(1, 2, 0)
        ours = preprocess_image(img, cfg)
        assert ours.dtype == np.float32
        assert ours.shape == (h, w, 3), (IMAGE_CASES[i], ours.shape, (h, w))
        assert (h, w) == resized_size(img.height, img.width, cfg)
        ref_patches, ref_pos = patchify(ref_hwc, 16)
        our_patches, our_pos = patchify(ours, 16)
        np.testing.assert_array_equal(our_pos, ref_pos)
        diff = float(np.abs(our_patches - ref_patches).max())
        worst = max(worst, diff)
        assert diff <= 1e-5, (IMAGE_CASES[i], diff)
        # The case really is random, not a flat image that would hide layout bugs.
        assert ours.std() > 0.1
    assert worst <= 1e-5


def test_resized_size_rules():
    cfg = ImageConfig()
    assert resized_size(37, 53, cfg) == (48, 64)  # small images are padded up to whole patches
    assert resized_size(1100, 700, cfg) == (1024, 656)  # 700/1.0742 = 651.6 -> 651 -> 41 patches
    assert resized_size(1024, 1024, cfg) == (1024, 1024)
    assert resized_size(300, 17, ImageConfig(longest_edge=64)) == (64, 16)
    assert patch_grid(1100, 700, cfg) == (64, 41)
    # A 1-pixel-high strip would floor to zero rows; keep one patch row instead.
    assert resized_size(1, 5000, cfg) == (16, 1024)
    with pytest.raises(ImageError):
        resized_size(0, 10, cfg)


def test_extreme_aspect_ratio_still_preprocesses():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (1, 5000, 3), dtype=np.uint8)
    out = preprocess_image(arr)
    assert out.shape == (16, 1024, 3)


def test_numpy_input_matches_pil_input():
    rng = np.random.default_rng(5)
    for channels in (1, 3, 4):
        arr = rng.integers(0, 256, (23, 41, channels), dtype=np.uint8)
        pil = Image.fromarray(arr[..., 0] if channels == 1 else arr)
        np.testing.assert_array_equal(preprocess_image(arr), preprocess_image(pil))
    # Float [0, 1] arrays are quantised to uint8 the usual way.
    arr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess_image(arr / 255.0), preprocess_image(arr))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        preprocess_image(arr.astype(np.float32))  # 0..255 floats are ambiguous
    with pytest.raises(ImageError, match="HWC"):
        preprocess_image(rng.integers(0, 256, (3, 20, 20, 2), dtype=np.uint8))


def test_transparency_is_composited_over_white():
    arr = np.zeros((16, 32, 4), dtype=np.uint8)
    arr[..., :3] = 17  # dark colour, fully transparent on the left half
    arr[:, 16:, 3] = 255  # opaque on the right half
    out = preprocess_image(Image.fromarray(arr, mode="RGBA"))
    white = (np.float32(1.0) - MEAN) / STD
    dark = (np.float32(17 / 255) - MEAN) / STD
    np.testing.assert_allclose(out[:, :16], np.broadcast_to(white, (16, 16, 3)), atol=1e-6)
    np.testing.assert_allclose(out[:, 16:], np.broadcast_to(dark, (16, 16, 3)), atol=1e-6)


def test_16bit_greyscale_is_scaled_not_clipped():
    rng = np.random.default_rng(7)
    wide = rng.integers(0, 65536, (32, 16), dtype=np.uint16)
    img16 = Image.fromarray(wide)
    assert img16.mode == "I;16"
    narrow = np.rint(wide / 257.0).astype(np.uint8)
    expected = preprocess_image(Image.fromarray(narrow, mode="L"))
    np.testing.assert_array_equal(preprocess_image(img16), expected)
    np.testing.assert_array_equal(preprocess_image(Image.fromarray(wide.astype(np.int32))), expected)


def test_zero_sized_image_raises():
    with pytest.raises(ImageError, match="zero size"):
        preprocess_image(Image.new("RGB", (0, 7)))
    with pytest.raises(ImageError, match="zero size"):
        preprocess_image(np.zeros((5, 0, 3), dtype=np.uint8))
    assert issubclass(ImageError, ValueError)


def test_patchify_layout_and_positions():
    rng = np.random.default_rng(3)
    img = rng.standard_normal((48, 32, 3)).astype(np.float32)
    patches, positions = patchify(img, 16)
    assert patches.shape == (6, 16 * 16 * 3)
    assert positions.dtype == np.int32
    np.testing.assert_array_equal(positions, [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]])
    for k, (r, c) in enumerate(positions):
        np.testing.assert_array_equal(patches[k], img[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16, :].reshape(-1))
    # Smaller patch size works the same way.
    small, small_pos = patchify(img, 8)
    assert small.shape == (24, 8 * 8 * 3)
    np.testing.assert_array_equal(small[7], img[8:16, 24:32].reshape(-1))
    np.testing.assert_array_equal(small_pos[7], [1, 3])
    with pytest.raises(ValueError, match="multiple"):
        patchify(img[:40], 16)


def test_image_token_layout():
    IMG, BRK, END = 10, 11, 12
    assert image_token_layout(2, 3, IMG, BRK, END) == [IMG, IMG, IMG, BRK, IMG, IMG, IMG, END]
    assert image_token_layout(1, 1, IMG, BRK, END) == [IMG, END]
    assert image_token_layout(3, 1, IMG, BRK, END) == [IMG, BRK, IMG, BRK, IMG, END]
    layout = image_token_layout(5, 7, IMG, BRK, END)
    assert layout.count(IMG) == 35 and layout.count(BRK) == 4 and layout[-1] == END
    with pytest.raises(ValueError):
        image_token_layout(0, 3, IMG, BRK, END)


def _encoded(fmt, rng, height=64, width=48):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _phone_jpeg(orientation: int) -> bytes:
    """A JPEG stored 40 wide and 100 high, tagged with an EXIF ``orientation`` as phones write them."""
    pixels = np.random.default_rng(orientation).integers(0, 256, (100, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tekken():
    from apriel_jax.data.tokenizer import load_tokenizer, pixtral_tekken_path

    return load_tokenizer(pixtral_tekken_path())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_transformers_pixels(tmp_path, orientation, tekken):
    hf_load_image = pytest.importorskip("transformers.image_utils").load_image
    from apriel_jax.data.chat import ChatFormat

    path = tmp_path / f"phone_{orientation}.jpg"
    path.write_bytes(_phone_jpeg(orientation))
    out = _hf_processor(1024)(hf_load_image(str(path)), return_tensors="np")
    h, w = (int(v) for v in out["image_sizes"][0])
    want = np.asarray(out["pixel_values"])[0, :, :h, :w].transpose(1, 2, 0)
    assert (h, w) == ((48, 112) if orientation >= 5 else (112, 48))  # 5-8 turn the image on its side

    cfg = ImageConfig()
    for image in (load_image(path), load_image(path.read_bytes()), Image.open(path)):  # decoded here or by the caller
        np.testing.assert_array_equal(preprocess_image(image, cfg), want)
    message = [{"role": "user", "content": [{"type": "image", "image": str(path)}]}]
    doc = ChatFormat().encode(message, tekken)
    np.testing.assert_array_equal(doc.images[0].patches, patchify(want)[0])


def test_load_image_roundtrip(tmp_path):
    rng = np.random.default_rng(11)
    data = _encoded("PNG", rng)
    path = tmp_path / "ok.png"
    path.write_bytes(data)
    from_path = load_image(path)
    from_str = load_image(str(path))
    from_bytes = load_image(data)
    assert from_path.size == (48, 64)
    np.testing.assert_array_equal(np.asarray(from_path), np.asarray(from_bytes))
    np.testing.assert_array_equal(np.asarray(from_str), np.asarray(from_bytes))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_files_raise_naming_path(tmp_path, fmt, keep):
    rng = np.random.default_rng(13)
    data = _encoded(fmt, rng, 96, 80)
    path = tmp_path / f"cut_{keep}.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value)


def test_corrupt_and_missing_files_raise_naming_path(tmp_path):
    rng = np.random.default_rng(17)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="junk.jpg"):
        load_image(junk)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png"):
        load_image(empty)

    # Valid PNG header, corrupted pixel data.
    data = bytearray(_encoded("PNG", rng))
    data[60:200] = bytes(140)
    broken = tmp_path / "broken.png"
    broken.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="broken.png"):
        load_image(broken)

    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png"):
        load_image(missing)

    with pytest.raises(ImageError, match="bytes"):
        load_image(b"not an image")
