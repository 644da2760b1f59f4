"""Prompts (text and images, interleaved) -> a left-padded generation batch in the batch contract.

Two steps, so a caller can inspect or cache the token ids before batching:

* :func:`encode_prompt` turns one prompt into token ids plus its images' patches; each image is
  replaced in the id stream by Pixtral's layout (rows of ``[IMG]``, ``[IMG_BREAK]`` between rows,
  ``[IMG_END]`` last), with ids taken from the tokenizer.
* :func:`prompt_batch` stacks prompts into arrays. Rows are LEFT padded so that every row's last
  prompt token sits in the last column and generation appends to all rows at the same index.

No chat template is applied here: the prompt is exactly BOS (optional) + the parts in order.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from PIL import Image

from .images import ImageConfig, image_token_layout, patchify, preprocess_image
from .tokenizer import Tokenizer

__all__ = ["PromptPart", "encode_prompt", "prompt_batch"]

PromptPart = Union[str, Image.Image, np.ndarray]
# One image of an encoded prompt: patches [N, p*p*C] float32 and their (row, col) [N, 2] int32.
EncodedImage = tuple[np.ndarray, np.ndarray]


def encode_prompt(parts: Sequence[PromptPart], tokenizer: Tokenizer, image_cfg: ImageConfig = ImageConfig(),
                  add_bos: bool = True) -> tuple[list[int], list[EncodedImage]]:
    """Token ids of a prompt and the patches of its images, in prompt order.

    ``parts`` are strings (encoded as plain text) and images (PIL images or HWC arrays, anything
    ``preprocess_image`` accepts). Each text part is encoded on its own, so token boundaries never
    span an image.
    """
    ids = [tokenizer.bos_id] if add_bos else []
    images: list[EncodedImage] = []
    p = image_cfg.patch_size
    for i, part in enumerate(parts):
        if isinstance(part, str):
            ids.extend(tokenizer.encode(part))
        elif isinstance(part, (Image.Image, np.ndarray)):
            pixels = preprocess_image(part, image_cfg)
            patches, positions = patchify(pixels, p)
            ids.extend(image_token_layout(pixels.shape[0] // p, pixels.shape[1] // p, tokenizer.image_id,
                                          tokenizer.image_break_id, tokenizer.image_end_id))
            images.append((patches, positions))
        else:
            raise TypeError(f"prompt part {i} is a {type(part).__name__}; expected str, PIL image or array")
    return ids, images


def prompt_batch(prompts: Sequence[tuple[Sequence[int], Sequence[EncodedImage]]], seq_len: int | None = None,
                 patch_budget: int | None = None, *, pad_id: int, image_id: int,
                 patch_dim: int | None = None) -> dict[str, np.ndarray]:
    """Left-padded batch-contract arrays for prompts from :func:`encode_prompt`.

    Args:
      prompts: one ``(ids, images)`` per row.
      seq_len: S (default: the longest prompt). ValueError if a prompt is longer.
      patch_budget: P, patches per row (default: the most any row has). ValueError if exceeded.
      pad_id: token id written into padding (``tokenizer.pad_id``).
      image_id: the ``[IMG]`` id; the k-th patch of a row feeds the row's k-th ``[IMG]`` token.
      patch_dim: width of a patch vector when no prompt has an image (default 16*16*3).

    Returns ``tokens, positions, segment_ids`` [B, S] int32 (pads: token ``pad_id``, segment 0,
    position 0; a prompt's tokens: segment 1, positions 0..n-1) and ``patches`` [B, P, D] float32,
    ``patch_positions`` [B, P, 2], ``patch_segment_ids`` [B, P] (1, 2, ... per image of the row,
    0 for padding) and ``patch_token_index`` [B, P] (S for padding). P may be 0.
    """
    if not prompts:
        raise ValueError("prompt_batch needs at least one prompt")
    rows = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids, _ in prompts]
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty")
    s = max(lengths) if seq_len is None else int(seq_len)
    too_long = [(b, n) for b, n in enumerate(lengths) if n > s]
    if too_long:
        b, n = max(too_long, key=lambda t: t[1])
        raise ValueError(f"prompt {b} has {n} tokens, {n - s} more than seq_len={s}")

    patch_counts = [sum(len(pos) for _, pos in images) for _, images in prompts]
    p = max(patch_counts) if patch_budget is None else int(patch_budget)
    over = [(b, n) for b, n in enumerate(patch_counts) if n > p]
    if over:
        b, n = max(over, key=lambda t: t[1])
        raise ValueError(f"prompt {b} has {n} image patches, {n - p} more than patch_budget={p}")
    dims = {patches.shape[1] for _, images in prompts for patches, _ in images}
    if len(dims) > 1:
        raise ValueError(f"images have different patch sizes (patch vector widths {sorted(dims)})")
    dim = dims.pop() if dims else (patch_dim or 16 * 16 * 3)

    b_size = len(prompts)
    out = {
        "tokens": np.full((b_size, s), pad_id, np.int32),
        "positions": np.zeros((b_size, s), np.int32),
        "segment_ids": np.zeros((b_size, s), np.int32),
        "patches": np.zeros((b_size, p, dim), np.float32),
        "patch_positions": np.zeros((b_size, p, 2), np.int32),
        "patch_segment_ids": np.zeros((b_size, p), np.int32),
        # Out of range on purpose: the model's scatter drops padding patches (mode="drop").
        "patch_token_index": np.full((b_size, p), s, np.int32),
    }
    for b, (ids, (_, images)) in enumerate(zip(rows, prompts)):
        n, start = len(ids), s - len(ids)
        out["tokens"][b, start:] = ids
        out["positions"][b, start:] = np.arange(n)
        out["segment_ids"][b, start:] = 1
        slots = start + np.flatnonzero(ids == image_id)
        if len(slots) != patch_counts[b]:
            raise ValueError(f"prompt {b} has {len(slots)} [IMG] tokens (id {image_id}) but its "
                             f"{len(images)} image(s) have {patch_counts[b]} patches")
        if not images:
            continue
        k = patch_counts[b]
        out["patches"][b, :k] = np.concatenate([patches for patches, _ in images])
        out["patch_positions"][b, :k] = np.concatenate([pos for _, pos in images])
        out["patch_segment_ids"][b, :k] = np.concatenate(
            [np.full(len(pos), i + 1, np.int32) for i, (_, pos) in enumerate(images)])
        # Both images and [IMG] runs are in prompt order, so the k-th patch goes to the k-th slot.
        out["patch_token_index"][b, :k] = slots
    return out
