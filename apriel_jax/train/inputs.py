"""Data sources of a run config -> the packed, checkpointable batch iterator of the training loop.

Without ``data.tokenizer`` text is byte-tokenized (``ByteTextToDocument``): no tokenizer file is needed, so
a run config is self-contained. With a tokenizer, records (text, chat, images, synthetic visual tasks) go
through ``RecordToDocument`` and the packer takes its special ids from that tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from apriel_jax.data.images import ImageConfig
from apriel_jax.data.packing import PackingConfig
from apriel_jax.data.pipeline import ByteTextToDocument, build_dataset
from apriel_jax.data.records import RecordToDocument, resolve_tokenizer_path
from apriel_jax.data.sources import ArrayRecordSource, JsonlSource
from apriel_jax.data.synthetic import TaskMixture
from apriel_jax.data.tokenizer import load_tokenizer

# Built-in text for smoke runs: short and repetitive, so a tiny model visibly learns it in a few steps.
BUILTIN_TEXT = "\n\n".join([
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine.",
    "all work and no play makes jack a dull boy.",
    "the rain in spain stays mainly in the plain.",
] * 4)

PATCH_FIELDS = ("patches", "patch_positions", "patch_segment_ids", "patch_token_index")


class ParagraphSource:
    """Random-access ``{"text": paragraph}`` records of plain text files (blank-line separated)."""

    def __init__(self, paths=(), text: str | None = None):
        texts = [Path(p).read_text(encoding="utf-8") for p in paths] if paths else [text or BUILTIN_TEXT]
        self.paragraphs = [p.strip() for t in texts for p in t.split("\n\n") if p.strip()]

    def __len__(self) -> int:
        return len(self.paragraphs)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.paragraphs[i]}


def make_source(spec: dict, cfg, seed: int):
    kind, paths = spec["kind"], list(spec.get("paths") or [])
    if kind == "bytes_text":
        return ParagraphSource(paths)
    if kind == "jsonl":
        return JsonlSource(paths)
    if kind == "array_record":
        return ArrayRecordSource(paths)
    if kind == "synthetic":
        if not cfg.data.tokenizer:
            raise ValueError(f"source {spec['name']!r}: synthetic visual tasks are chats with images and need "
                             "data.tokenizer (a tokenizer path or 'pixtral')")
        return TaskMixture(seed=seed)
    raise ValueError(f"source {spec['name']!r}: unknown kind {kind!r}")


def packing_config(cfg) -> PackingConfig:
    if not cfg.data.tokenizer:  # byte-level text: the model's image id, the default break/end ids
        return PackingConfig(seq_len=cfg.data.seq_len, patch_budget=cfg.data.patch_budget,
                             image_token_id=cfg.model.image_token_id)
    tok = load_tokenizer(resolve_tokenizer_path(cfg.data.tokenizer))
    if tok.image_id != cfg.model.image_token_id:
        raise ValueError(f"tokenizer [IMG] id {tok.image_id} differs from model.image_token_id "
                         f"{cfg.model.image_token_id}")
    return PackingConfig(seq_len=cfg.data.seq_len, patch_budget=cfg.data.patch_budget, pad_id=tok.pad_id,
                         image_token_id=tok.image_id, image_break_id=tok.image_break_id,
                         image_end_id=tok.image_end_id)


def to_document(cfg):
    if not cfg.data.tokenizer:
        return ByteTextToDocument()
    return RecordToDocument(cfg.data.tokenizer, mode=cfg.data.chat_format, loss=cfg.data.loss,
                            image_cfg=ImageConfig(longest_edge=cfg.model.vision.image_size),
                            patch_budget=cfg.data.patch_budget or None)


def make_dataset(cfg, sources, seed: int):
    """This process's slice of the packed global batches of ``sources`` (a list of source dicts)."""
    specs = {s["name"]: (make_source(s, cfg, seed), float(s.get("weight", 1.0))) for s in sources}
    return build_dataset(specs, to_document(cfg), packing_config(cfg), global_batch=cfg.data.global_batch,
                         seed=seed, process_index=jax.process_index(), process_count=jax.process_count(),
                         worker_count=cfg.data.worker_count, max_pending=cfg.data.max_pending)


def model_inputs(batch: dict, patch_budget: int) -> dict:
    """The arrays the step consumes; text-only runs drop the empty patch fields (no vision pass)."""
    if patch_budget == 0:
        return {k: v for k, v in batch.items() if k not in PATCH_FIELDS}
    return batch


def image_patch_counts(batch: dict) -> list[int]:
    """Patches of every image in the batch (for the FLOP count of the vision tower)."""
    seg = batch.get("patch_segment_ids")
    if seg is None:
        return []
    counts = []
    for row in np.asarray(seg):
        ids, n = np.unique(row[row > 0], return_counts=True)
        counts.extend(int(c) for c in n)
    return counts
