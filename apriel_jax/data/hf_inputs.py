"""Convert what a transformers Pixtral/Llava processor returns into the batch contract.

The HF model scatters image features into the ``[IMG]`` positions of the
flattened batch, image after image, row after row. We reproduce that
assignment but require every image to land entirely inside one row (anything
else would mean an image's patches attend across documents), and we make the
patch -> token mapping explicit via ``patch_token_index``.

torch is never imported here: tensors are recognised by duck typing so this
module stays importable (and cheap) without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .batch import Batch, BatchAssembler
from .images import patchify
from .types import ImagePatches

__all__ = ["from_hf_inputs"]


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, torch tensor (any device / bf16), or nested list."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach()
        if hasattr(x, "cpu"):
            x = x.cpu()
        try:
            return x.numpy()
        except TypeError:
            # bfloat16 (and a few other dtypes) have no numpy equivalent.
            return x.float().numpy()
    if hasattr(x, "numpy"):  # e.g. tf / jax-like objects
        return np.asarray(x.numpy())
    return np.asarray(x)


def _split_images(pixel_values: Any) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Per-image CHW arrays plus the (H, W) each array actually holds."""
    if isinstance(pixel_values, (list, tuple)):
        images: list[np.ndarray] = []
        for item in pixel_values:
            arr = _to_numpy(item)
            if arr.ndim == 4:
                images.extend(arr)
            elif arr.ndim == 3:
                images.append(arr)
            else:
                raise ValueError(
                    f"each entry of a pixel_values list must be [3, H, W] (or [N, 3, H, W]), got shape {arr.shape}"
                )
    else:
        arr = _to_numpy(pixel_values)
        if arr.ndim != 4:
            raise ValueError(f"pixel_values must be [N_img, 3, H, W], got shape {arr.shape}")
        images = list(arr)
    for i, img in enumerate(images):
        if img.shape[0] != 3:
            raise ValueError(f"image {i} must be channel-first with 3 channels, got shape {img.shape}")
    return images, [(int(img.shape[1]), int(img.shape[2])) for img in images]


def from_hf_inputs(
    input_ids: Any,
    pixel_values: Any = None,
    image_sizes: Any = None,
    attention_mask: Any = None,
    *,
    image_token_id: int,
    patch_size: int = 16,
    patch_budget: int | None = None,
    seq_len: int | None = None,
    pad_id: int = 0,
) -> Batch:
    """Build a :class:`~.batch.Batch` from HF processor outputs (through the one batch assembler).

    Args:
      input_ids: [B, S] (or [S]) token ids.
      pixel_values: [N_img, 3, Hmax, Wmax] zero-padded bottom/right, or a list of
        per-image [3, H, W] arrays; None for a text-only batch.
      image_sizes: [N_img, 2] true (H, W) of each image in pixels. If omitted,
        each image is taken to fill its array (exact for lists and single images).
      attention_mask: [B, S] 1 for real tokens, 0 for padding (default all ones).
      image_token_id: id of the ``[IMG]`` token.
      patch_budget: patches per row P (default: the most any row needs).
      seq_len: output sequence length (default S); longer pads on the right.
      pad_id: token written into padding positions and the last target.

    Returns:
      the batch with all its fields, labels included: ``targets`` is the next
      token of the row, counted in ``loss_mask`` when both tokens share a
      non-padding segment and the target is not ``[IMG]``. Raises ValueError
      when images and ``[IMG]`` tokens do not line up row by row.
    """
    ids = _to_numpy(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    batch, src_len = ids.shape
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise ValueError("input_ids must be non-negative and fit in int32")

    if attention_mask is None:
        mask = np.ones((batch, src_len), dtype=np.int32)
    else:
        mask = _to_numpy(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("attention_mask must contain only 0 and 1")
        mask = mask.astype(np.int32)

    out_len = src_len if seq_len is None else int(seq_len)
    if out_len < src_len:
        raise ValueError(f"seq_len={out_len} is shorter than input_ids length {src_len}")

    # ---- images -> rows -------------------------------------------------
    p = patch_size
    img_tokens_per_row = (ids == image_token_id).sum(axis=1)
    row_images: list[list[ImagePatches]] = [[] for _ in range(batch)]

    if pixel_values is None:
        if image_sizes is not None:
            raise ValueError("image_sizes given without pixel_values")
        n_images = 0
    else:
        images, held = _split_images(pixel_values)
        n_images = len(images)
        if image_sizes is None:
            sizes = held
        else:
            sz = _to_numpy(image_sizes).astype(np.int64).reshape(-1, 2)
            if len(sz) != n_images:
                raise ValueError(f"image_sizes has {len(sz)} entries but pixel_values holds {n_images} images")
            sizes = [(int(h), int(w)) for h, w in sz]

        patch_counts = []
        for i, ((h, w), (hh, hw)) in enumerate(zip(sizes, held)):
            if h <= 0 or w <= 0 or h % p or w % p:
                raise ValueError(f"image {i} size {h}x{w} is not a positive multiple of patch_size={p}")
            if h > hh or w > hw:
                raise ValueError(f"image {i} size {h}x{w} exceeds its pixel_values extent {hh}x{hw}")
            patch_counts.append((h // p) * (w // p))

        total_tokens = int(img_tokens_per_row.sum())
        total_patches = int(sum(patch_counts))
        if total_tokens != total_patches:
            raise ValueError(
                f"input_ids contain {total_tokens} image tokens (id {image_token_id}) but the "
                f"{n_images} images provide {total_patches} patches"
            )

        # Same order HF uses: images fill [IMG] slots row by row.
        nxt = 0
        for b in range(batch):
            need = int(img_tokens_per_row[b])
            have = 0
            first = nxt
            while have < need and nxt < n_images:
                have += patch_counts[nxt]
                nxt += 1
            if have != need:
                raise ValueError(
                    f"row {b} has {need} image tokens but images {first}..{nxt - 1} provide {have} "
                    "patches; an image must not straddle rows"
                )
            for i in range(first, nxt):
                h, w = sizes[i]
                chw = np.asarray(images[i][:, :h, :w], dtype=np.float32)
                row_images[b].append(ImagePatches(*patchify(np.transpose(chw, (1, 2, 0)), p)))

    # ---- patch budget ----------------------------------------------------
    per_row = [sum(image.num_patches for image in row) for row in row_images]
    needed = max(per_row, default=0)
    budget = needed if patch_budget is None else int(patch_budget)
    if budget < needed:
        worst = int(np.argmax(per_row))
        raise ValueError(f"patch_budget={budget} is too small: row {worst} has {needed} patches")
    assembler = BatchAssembler(batch, out_len, budget, p * p * 3, pad_id=pad_id)

    # ---- text -------------------------------------------------------------
    # Whole rows as HF lays them out (the ids under padding included), so written column-wise here
    # rather than document by document.
    arrays = assembler.arrays
    arrays["tokens"][:, :src_len] = ids
    arrays["segment_ids"][:, :src_len] = mask
    # HF generate derives positions the same way (cumsum of the mask), which is
    # what makes left padding transparent to RoPE.
    arrays["positions"][:, :src_len] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    arrays["targets"][:, :-1] = arrays["tokens"][:, 1:]
    segment_ids = arrays["segment_ids"]
    same_doc = (segment_ids[:, :-1] != 0) & (segment_ids[:, :-1] == segment_ids[:, 1:])
    arrays["loss_mask"][:, :-1] = same_doc & (arrays["targets"][:, :-1] != image_token_id)

    # ---- patches ----------------------------------------------------------
    # Counts match exactly (checked above), so the k-th patch of the row
    # goes to the k-th [IMG] token, matching HF's masked_scatter order.
    for b, row in enumerate(row_images):
        assembler.add_images(b, row, np.flatnonzero(ids[b] == image_token_id))
    return assembler.batch()
