"""Check a batch against the contract (:class:`~.batch.Batch`) with chex where it enters the model.

The assembler builds batches right by construction; this catches what reaches the model by another
road (a hand-made batch, a notebook, a changed loader), with a message that names the field, before
jit turns a wrong shape into an opaque trace error or a silent recompile. The train step and
``generate`` call :func:`check_batch_in_debug`, which runs only under ``APRIEL_DEBUG``
(``apriel-jax --debug``); it reads shapes and dtypes outside jit and moves no data, so a normal run
pays one environment lookup. Tests call :func:`check_batch` directly.

Kept apart from ``batch.py`` because chex imports jax, and the assembler runs in grain workers.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import chex

from apriel_jax.storage.errors import DEBUG_ENV

from .batch import FIELDS, LABELS, PATCH_FIELDS

__all__ = ["check_batch", "check_batch_in_debug"]


def check_batch(batch: Mapping[str, Any], *, labels: bool) -> None:
    """AssertionError unless ``batch`` holds the contract's fields with agreeing shapes and dtypes.

    The text fields are required. The patch fields come all together or not at all (a text-only
    batch). With ``labels`` (training) ``targets`` and ``loss_mask`` are required; without, they are
    checked when present. Keys outside the contract are left alone.
    """
    required = [name for name in FIELDS if name not in PATCH_FIELDS and (labels or name not in LABELS)]
    if any(name in batch for name in PATCH_FIELDS):
        required += PATCH_FIELDS
    missing = [name for name in required if name not in batch]
    if missing:
        raise AssertionError(f"batch lacks field(s) {missing}")

    chex.assert_rank(batch["tokens"], 2, custom_message="batch field 'tokens'")
    sizes = dict(zip("BS", batch["tokens"].shape))
    if "patches" in batch:
        chex.assert_rank(batch["patches"], 3, custom_message="batch field 'patches'")
        sizes.update(zip("PD", batch["patches"].shape[1:]))
    for name, spec in FIELDS.items():
        if name in batch:
            where = f"batch field {name!r}"
            shape = tuple(sizes[d] if d in sizes else int(d) for d in spec.dims)
            chex.assert_shape(batch[name], shape, custom_message=where)
            chex.assert_type(batch[name], spec.dtype, custom_message=where)


def check_batch_in_debug(batch: Mapping[str, Any], *, labels: bool) -> None:
    """:func:`check_batch` when ``APRIEL_DEBUG`` is set; nothing otherwise."""
    if os.environ.get(DEBUG_ENV):
        check_batch(batch, labels=labels)
