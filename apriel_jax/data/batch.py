"""The batch contract, written once: :class:`Batch` (its fields, shapes, dtypes and padding) and
:class:`BatchAssembler`, the one place that allocates a batch and places images into it.

Packing (``packing.rows_to_batch``), prompting (``prompt.prompt_batch``) and HF processor outputs
(``hf_inputs.from_hf_inputs``) all assemble through it, so the three routes cannot drift apart in
how padding looks or how a patch finds its ``[IMG]`` token. ``batch_check.check_batch`` verifies a
batch against the same declaration at the model and train-step boundaries.

Dims are symbolic: ``B`` rows, ``S`` tokens per row, ``P`` patches per row (the patch budget), ``D``
the width of a patch vector (16*16*3 for Pixtral). Everything here is numpy-only so it runs inside
grain worker processes.
"""

# No `from __future__ import annotations` here: TypedDict only recognises NotRequired (the optional
# label fields) in annotations that are evaluated, not strings.
import typing
from typing import Annotated, NamedTuple, NotRequired, Sequence, TypedDict

import numpy as np

from .types import ImagePatches

__all__ = ["Field", "Batch", "FIELDS", "LABELS", "PATCH_FIELDS", "BatchAssembler"]


class Field(NamedTuple):
    dims: tuple[str, ...]  # symbolic dims: "B", "S", "P", "D"; digits are literal sizes
    dtype: type
    pad: str | int = 0  # value of padding: a number, "pad_id" (the tokenizer's pad) or "S" (out of range)


class Batch(TypedDict):
    """One batch in the contract (README "The batch contract"); ``Annotated`` carries each field's spec."""

    tokens: Annotated[np.ndarray, Field(("B", "S"), np.int32, "pad_id")]  # input ids, packed documents
    # Labels: training batches carry them; generation batches (prompt_batch) leave them out.
    targets: NotRequired[Annotated[np.ndarray, Field(("B", "S"), np.int32, "pad_id")]]  # next-token labels
    loss_mask: NotRequired[Annotated[np.ndarray, Field(("B", "S"), np.float32)]]  # 1 where the loss counts
    segment_ids: Annotated[np.ndarray, Field(("B", "S"), np.int32)]  # document id within the row, 0 = padding
    positions: Annotated[np.ndarray, Field(("B", "S"), np.int32)]  # position within its document
    patches: Annotated[np.ndarray, Field(("B", "P", "D"), np.float32)]  # normalised patches, row-major per image
    patch_positions: Annotated[np.ndarray, Field(("B", "P", "2"), np.int32)]  # (row, col) in its image
    patch_segment_ids: Annotated[np.ndarray, Field(("B", "P"), np.int32)]  # image id within the row, 0 = padding
    # Index in tokens of the [IMG] slot this patch feeds. Padding points past the row (S) on purpose:
    # the model's scatter drops it (mode="drop").
    patch_token_index: Annotated[np.ndarray, Field(("B", "P"), np.int32, "S")]


def _field_specs() -> dict[str, Field]:
    specs = {}
    for name, hint in typing.get_type_hints(Batch, include_extras=True).items():
        if typing.get_origin(hint) is NotRequired:
            (hint,) = typing.get_args(hint)
        specs[name] = hint.__metadata__[0]
    return specs


FIELDS: dict[str, Field] = _field_specs()
LABELS: tuple[str, ...] = tuple(sorted(Batch.__optional_keys__, key=list(FIELDS).index))
PATCH_FIELDS: tuple[str, ...] = tuple(name for name in FIELDS if "P" in FIELDS[name].dims)


class BatchAssembler:
    """Fills a padded :class:`Batch` of ``rows`` x ``seq_len`` tokens and ``patch_budget`` patches per row.

    Text goes in with :meth:`add_document` (or, for inputs whose text arrays are already laid out,
    straight into :attr:`arrays`); images go in with :meth:`add_images`, which appends to the row's
    patches and numbers images 1, 2, ... within the row. :meth:`batch` hands the arrays over.
    """

    def __init__(self, rows: int, seq_len: int, patch_budget: int, patch_dim: int, *, pad_id: int,
                 labels: bool = True):
        sizes = {"B": rows, "S": seq_len, "P": patch_budget, "D": patch_dim}
        pads = {"pad_id": pad_id, "S": seq_len}
        self.labels = labels
        self.arrays: dict[str, np.ndarray] = {
            name: np.full(tuple(sizes[d] if d in sizes else int(d) for d in spec.dims),
                          pads.get(spec.pad, spec.pad), spec.dtype)
            for name, spec in FIELDS.items() if labels or name not in LABELS
        }
        self._patches_used = [0] * rows
        self._images_used = [0] * rows

    def add_document(self, row: int, start: int, tokens: np.ndarray, segment: int = 1,
                     loss_mask: np.ndarray | None = None) -> None:
        """Write one document at ``[start, start + n)`` of ``row`` as ``segment``, positions 0..n-1.

        With labels, targets are the document's own next tokens and ``loss_mask[i]`` says whether
        token i is a target (the ``Document`` convention), so the last token predicts nothing and
        no label crosses into a neighbouring document.
        """
        n, stop = len(tokens), start + len(tokens)
        a = self.arrays
        a["tokens"][row, start:stop] = tokens
        a["segment_ids"][row, start:stop] = segment
        a["positions"][row, start:stop] = np.arange(n, dtype=np.int32)
        if self.labels:
            a["targets"][row, start:stop - 1] = tokens[1:]
            a["loss_mask"][row, start:stop - 1] = loss_mask[1:]

    def add_images(self, row: int, images: Sequence[ImagePatches], slots: np.ndarray) -> None:
        """Append ``images`` to ``row``'s patches; the k-th patch feeds the token at ``slots[k]``.

        Images and their ``[IMG]`` runs are both in token order, so patches and slots pair up in order.
        """
        count = sum(image.num_patches for image in images)
        if len(slots) != count:
            raise ValueError(f"row {row}: {len(slots)} [IMG] slots for {count} patches")
        first, budget = self._patches_used[row], self.arrays["patches"].shape[1]
        if first + count > budget:
            raise ValueError(f"row {row} needs {first + count} patches; the patch budget is {budget}")
        if not images:
            return
        span = slice(first, first + count)
        a, numbered = self.arrays, self._images_used[row]
        a["patches"][row, span] = np.concatenate([image.patches for image in images])
        a["patch_positions"][row, span] = np.concatenate([image.positions for image in images])
        a["patch_segment_ids"][row, span] = np.concatenate(
            [np.full(image.num_patches, numbered + k + 1, np.int32) for k, image in enumerate(images)])
        a["patch_token_index"][row, span] = slots
        self._patches_used[row] += count
        self._images_used[row] += len(images)

    def batch(self) -> Batch:
        return typing.cast(Batch, self.arrays)
