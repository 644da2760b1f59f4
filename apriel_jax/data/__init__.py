"""Data pipeline pieces. Kept free of jax imports so worker processes stay light."""

from .hf_inputs import from_hf_inputs
from .images import (
    ImageConfig,
    ImageError,
    image_token_layout,
    load_image,
    patch_grid,
    patchify,
    preprocess_image,
    resized_size,
)

__all__ = [
    "ImageConfig",
    "ImageError",
    "from_hf_inputs",
    "image_token_layout",
    "load_image",
    "patch_grid",
    "patchify",
    "preprocess_image",
    "resized_size",
]
