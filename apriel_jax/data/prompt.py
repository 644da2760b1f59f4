"""Prompts (text and images, interleaved) -> a left-padded generation batch in the batch contract.

Two steps, so a caller can inspect or cache the token ids before batching:

* :func:`encode_prompt` turns one prompt into token ids plus its images' patches; each image is
  replaced in the id stream by Pixtral's layout (rows of ``[IMG]``, ``[IMG_BREAK]`` between rows,
  ``[IMG_END]`` last), with ids taken from the tokenizer.
* :func:`prompt_batch` stacks prompts into a :class:`~.batch.Batch` through the one batch assembler.
  Rows are LEFT padded so that every row's last prompt token sits in the last column and generation
  appends to all rows at the same index.

No chat template is applied here: the prompt is exactly BOS (optional) + the parts in order.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from PIL import Image

from .batch import Batch, BatchAssembler
from .images import ImageConfig, image_token_layout, patchify, preprocess_image
from .tokenizer import Tokenizer
from .types import ImagePatches

__all__ = ["PromptPart", "encode_prompt", "prompt_batch"]

PromptPart = Union[str, Image.Image, np.ndarray]


def encode_prompt(parts: Sequence[PromptPart], tokenizer: Tokenizer, image_cfg: ImageConfig = ImageConfig(),
                  add_bos: bool = True) -> tuple[list[int], list[ImagePatches]]:
    """Token ids of a prompt and the patches of its images, in prompt order.

    ``parts`` are strings (encoded as plain text) and images (PIL images or HWC arrays, anything
    ``preprocess_image`` accepts). Each text part is encoded on its own, so token boundaries never
    span an image.
    """
    ids = [tokenizer.bos_id] if add_bos else []
    images: list[ImagePatches] = []
    p = image_cfg.patch_size
    for i, part in enumerate(parts):
        if isinstance(part, str):
            ids.extend(tokenizer.encode(part))
        elif isinstance(part, (Image.Image, np.ndarray)):
            pixels = preprocess_image(part, image_cfg)
            patches, positions = patchify(pixels, p)
            ids.extend(image_token_layout(pixels.shape[0] // p, pixels.shape[1] // p, tokenizer.image_id,
                                          tokenizer.image_break_id, tokenizer.image_end_id))
            images.append(ImagePatches(patches, positions))
        else:
            raise TypeError(f"prompt part {i} is a {type(part).__name__}; expected str, PIL image or array")
    return ids, images


def prompt_batch(prompts: Sequence[tuple[Sequence[int], Sequence[ImagePatches]]], seq_len: int | None = None,
                 patch_budget: int | None = None, *, pad_id: int, image_id: int,
                 patch_dim: int | None = None) -> Batch:
    """Left-padded :class:`Batch` for prompts from :func:`encode_prompt`, without labels.

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
    0 for padding) and ``patch_token_index`` [B, P] (S for padding). P may be 0. There are no
    ``targets``/``loss_mask``: a prompt is for generation, not training.
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

    patch_counts = [sum(image.num_patches for image in images) for _, images in prompts]
    p = max(patch_counts) if patch_budget is None else int(patch_budget)
    over = [(b, n) for b, n in enumerate(patch_counts) if n > p]
    if over:
        b, n = max(over, key=lambda t: t[1])
        raise ValueError(f"prompt {b} has {n} image patches, {n - p} more than patch_budget={p}")
    dims = {image.patches.shape[1] for _, images in prompts for image in images}
    if len(dims) > 1:
        raise ValueError(f"images have different patch sizes (patch vector widths {sorted(dims)})")
    dim = dims.pop() if dims else (patch_dim or 16 * 16 * 3)

    assembler = BatchAssembler(len(prompts), s, p, dim, pad_id=pad_id, labels=False)
    for b, (ids, (_, images)) in enumerate(zip(rows, prompts)):
        start = s - len(ids)
        assembler.add_document(b, start, ids)
        slots = start + np.flatnonzero(ids == image_id)
        if len(slots) != patch_counts[b]:
            raise ValueError(f"prompt {b} has {len(slots)} [IMG] tokens (id {image_id}) but its "
                             f"{len(images)} image(s) have {patch_counts[b]} patches")
        assembler.add_images(b, images, slots)
    return assembler.batch()
