"""Pixtral image preprocessing: decode, turn upright, convert to RGB, resize, normalise, patchify.

The numerics follow transformers' ``load_image`` + PIL-backend ``PixtralImageProcessor`` so
that pixel values agree with a reference HF pipeline:

* every PIL image, decoded here or handed in, is first turned as its EXIF
  orientation tag says (a phone photo stored sideways comes out upright), as
  transformers' ``load_image`` does with ``ImageOps.exif_transpose``;

* the resize is done by PIL on the **uint8** RGB image (not on floats), so any
  rounding PIL does to uint8 is part of the result;
* rescaling is ``uint8 -> float64 * (1/255) -> float32`` and normalisation is
  ``(x - mean) / std`` evaluated in float32, in exactly that order.

Deviations from HF, both only where HF's behaviour is unhelpful:

* 16-bit / 32-bit integer greyscale images (modes ``I;16*`` and ``I``) are
  scaled to 8 bits (``/257``). PIL's ``convert("RGB")``, which HF uses, clips
  them at 255 instead, turning most 16-bit images white.
* An extreme aspect ratio whose short side would floor to 0 pixels is kept at
  one patch instead of producing an empty image.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

__all__ = [
    "ImageConfig",
    "ImageError",
    "image_token_layout",
    "load_image",
    "patch_grid",
    "patchify",
    "preprocess_image",
    "resized_size",
]


class ImageError(ValueError):
    """An image could not be decoded or is unusable (empty, corrupt, truncated)."""


@dataclass(frozen=True)
class ImageConfig:
    longest_edge: int = 1024
    patch_size: int = 16
    # CLIP statistics, the Pixtral/HF defaults.
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.longest_edge < 1 or self.patch_size < 1:
            raise ValueError(
                f"longest_edge and patch_size must be >= 1, got {self.longest_edge}, {self.patch_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have 3 entries (RGB)")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

ImageLike = Union[Image.Image, np.ndarray]


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def resized_size(height: int, width: int, cfg: ImageConfig = ImageConfig()) -> tuple[int, int]:
    """(H, W) in pixels that ``preprocess_image`` produces for an input of ``height x width``.

    Cheap (no decoding), so a data pipeline can budget patches from image
    headers alone. Both results are multiples of ``cfg.patch_size``.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image has zero size ({height}x{width})")
    limit = cfg.longest_edge
    # Same expression order as HF so float rounding (and hence the floor)
    # matches bit for bit.
    ratio = max(height / limit, width / limit)
    if ratio > 1:
        height = int(math.floor(height / ratio))
        width = int(math.floor(width / ratio))
    p = cfg.patch_size
    # max(1, ...): a 1x5000 strip would otherwise floor to 0 rows.
    h_patches = max(1, (height - 1) // p + 1)
    w_patches = max(1, (width - 1) // p + 1)
    return h_patches * p, w_patches * p


def patch_grid(height: int, width: int, cfg: ImageConfig = ImageConfig()) -> tuple[int, int]:
    """(rows, cols) of patches for an input image of ``height x width`` pixels."""
    h, w = resized_size(height, width, cfg)
    return h // cfg.patch_size, w // cfg.patch_size


# ---------------------------------------------------------------------------
# Colour conversion
# ---------------------------------------------------------------------------

_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def _composite_on_white(img: Image.Image) -> Image.Image:
    # alpha_composite (rather than paste) because that is what HF does; the two
    # round differently by up to one grey level.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_to_8bit(arr: np.ndarray, mode: str) -> Image.Image:
    a = np.asarray(arr)
    if mode == "F" or np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        # Float images are either [0, 1] or already on a 0..255 scale.
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            a = a * 255.0
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        a = np.clip(a.astype(np.float64), 0.0, 65535.0) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def _upright(img: Image.Image) -> Image.Image:
    """``img`` as it is meant to be seen: its EXIF orientation (2-8) applied and the tag removed, so
    applying it again changes nothing. Images without the tag are returned as they are (no copy)."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):
        return img
    return ImageOps.exif_transpose(img)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    img = _upright(img)
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"image has zero size ({h}x{w})")
    mode = img.mode
    try:
        if mode == "RGB":
            return img
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            return _composite_on_white(img)
        if mode in _WIDE_INT_MODES or mode == "F":
            return _wide_to_8bit(np.asarray(img), mode).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"cannot convert image of mode {mode!r} to RGB: {err}") from err


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(
            f"expected an HWC image array with 1, 3 or 4 channels (or HW greyscale), got shape {a.shape}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"image has zero size ({a.shape[0]}x{a.shape[1]})")

    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or a.min() < 0.0 or a.max() > 1.0:
            raise ImageError(
                f"float image arrays must be in [0, 1], got range [{np.nanmin(a)}, {np.nanmax(a)}]"
            )
        a = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise ImageError(
                f"integer image arrays of dtype {a.dtype} must be in [0, 255], "
                f"got range [{a.min()}, {a.max()}]"
            )
        a = a.astype(np.uint8)
    else:
        raise ImageError(f"unsupported image array dtype {a.dtype}")

    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.ndim if a.ndim == 2 else a.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(a), mode=mode)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def to_rgb(image: "ImageLike") -> Image.Image:
    """A PIL RGB image from a PIL image of any mode or an HWC/HW array, with the same conversions and
    checks (EXIF orientation, alpha over white, 16-bit scaling, zero size) that :func:`preprocess_image`
    applies."""
    return _array_to_pil(image) if isinstance(image, np.ndarray) else _pil_to_rgb(image)


def resize_like_preprocessing(image: Image.Image, size_hw: tuple[int, int], cfg: "ImageConfig") -> Image.Image:
    """Resize an RGB image to (height, width) with the filter ``cfg`` names, as preprocessing does."""
    height, width = size_hw
    return image.resize((width, height), resample=_RESAMPLE[cfg.resample])


def preprocess_image(image: ImageLike, cfg: ImageConfig = ImageConfig()) -> np.ndarray:
    """Decoded image -> float32 HWC normalised pixels, H and W multiples of ``cfg.patch_size``.

    Accepts a PIL image of any mode or an HWC / HW numpy array (uint8, bool,
    uint16, other ints in [0, 255], or floats in [0, 1]). A PIL image is first
    turned as its EXIF orientation tag says. Transparency is composited over
    white before dropping alpha.
    """
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        pil = _array_to_pil(image)
    else:
        raise TypeError(f"expected a PIL.Image.Image or numpy array, got {type(image).__name__}")

    rgb = _pil_to_rgb(pil)
    width, height = rgb.size
    out_h, out_w = resized_size(height, width, cfg)
    # PIL returns a plain copy when the size is unchanged, so no special case.
    rgb = rgb.resize((out_w, out_h), resample=_RESAMPLE[cfg.resample])
    pixels = np.asarray(rgb, dtype=np.uint8)

    # HF rescales in float64 then casts, and normalises in float32; doing the
    # same keeps results bit-identical rather than merely close.
    x = (pixels.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return (x - mean) / std


def patchify(image_hwc: np.ndarray, patch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Split an HWC image into row-major patches.

    Returns ``patches [N, p*p*C]`` (each flattened in (row, col, channel) order,
    i.e. ``img[r*p:(r+1)*p, c*p:(c+1)*p, :].reshape(-1)``) and
    ``positions [N, 2] int32`` holding each patch's (row, col) in the grid.
    """
    img = np.asarray(image_hwc)
    if img.ndim != 3:
        raise ValueError(f"patchify expects an HWC image, got shape {img.shape}")
    height, width, channels = img.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={p}")
    rows, cols = height // p, width // p
    patches = (
        img.reshape(rows, p, cols, p, channels)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * cols, p * p * channels)
    )
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.int32), np.arange(cols, dtype=np.int32), indexing="ij")
    positions = np.stack([rr.reshape(-1), cc.reshape(-1)], axis=-1)
    return np.ascontiguousarray(patches), positions


def image_token_layout(h_patches: int, w_patches: int, img_id: int, break_id: int, end_id: int) -> list[int]:
    """Pixtral's token sequence for an ``h x w`` patch grid.

    Each grid row is ``w`` image tokens followed by a break; the final row ends
    with ``end_id`` instead of a break.
    """
    if h_patches < 1 or w_patches < 1:
        raise ValueError(f"patch grid must be at least 1x1, got {h_patches}x{w_patches}")
    row = [img_id] * w_patches + [break_id]
    tokens = row * h_patches
    tokens[-1] = end_id
    return tokens


def _read_file(name: str) -> bytes:
    if name.startswith("gs://"):
        from apriel_jax import storage  # local: keeps this module light for local-only use

        return storage.read_bytes(name)
    with open(name, "rb") as f:
        return f.read()


def load_image(path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> Image.Image:
    """Decode an image file (a local path, a ``gs://`` URL) or bytes fully, raising ``ImageError``
    (naming the source) on any failure.

    The image comes out upright: its EXIF orientation tag is applied. The whole
    file is decoded here (``Image.load``) so corrupt or truncated
    data fails at load time rather than later inside a worker. Truncated files
    raise as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (PIL's
    default); if other code flips that global, PIL pads truncated images with
    grey and this function cannot tell.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        name = f"<{len(path_or_bytes)} bytes>"
        data = bytes(path_or_bytes)
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        name = os.fspath(path_or_bytes)
        try:
            data = _read_file(name)
        except OSError as err:  # also storage.StorageError (credentials, bucket, permission)
            raise ImageError(f"cannot read image file {name!r}: {err}") from err
    else:
        raise TypeError(f"expected a path or bytes, got {type(path_or_bytes).__name__}")

    try:
        # Reading into memory first means the returned image holds no file
        # handle, so callers need no context manager.
        img = Image.open(io.BytesIO(data))
        img.load()
        img = _upright(img)
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {name!r} is too large to decode safely: {err}") from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"cannot decode image {name!r}: {type(err).__name__}: {err}") from err
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"image {name!r} has zero size ({h}x{w})")
    return img
