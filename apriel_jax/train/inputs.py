"""Data sources of a run config -> the packed, checkpointable batch iterator of the training loop.

Without ``data.tokenizer`` text is byte-tokenized (``ByteTextToDocument``): no tokenizer file is needed, so
a run config is self-contained. With a tokenizer, records (text, chat, images, synthetic visual tasks) go
through ``RecordToDocument`` and the packer takes its special ids from that tokenizer.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from apriel_jax.data.images import ImageConfig
from apriel_jax.data.packing import PackingConfig
from apriel_jax.data.pipeline import (
    ByteTextToDocument,
    build_dataset,
    merge_row_states,
    select_row_state,
)
from apriel_jax.data.records import RecordToDocument, resolve_tokenizer_path
from apriel_jax.data.sources import ArrayRecordSource, JsonlSource
from apriel_jax.data.synthetic import TaskMixture
from apriel_jax.data.synthetic.text import SyntheticReasoningChats, SyntheticText
from apriel_jax.data.tokenizer import load_tokenizer
from apriel_jax.parallel.distributed import allgather_bytes
from apriel_jax.parallel.rules import logical_to_spec

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


def synthetic_image_size(spec: dict) -> int:
    """Side in pixels of the square images of a ``synthetic`` source (option ``image_size``, default 256)."""
    return int((spec.get("options") or {}).get("image_size", 256))


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
        opts = dict(spec.get("options") or {})
        size = synthetic_image_size(spec)
        return TaskMixture(weights=opts.get("tasks") or None, difficulty=opts.get("difficulty", 0.5),
                           size=(size, size), seed=seed)
    if kind == "synthetic_chat":
        return SyntheticReasoningChats(seed=seed)
    if kind == "synthetic_text":
        return SyntheticText(topics=dict((spec.get("options") or {}).get("topics") or {}) or None, seed=seed)
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


def make_dataset(cfg, sources, seed: int, rows=None):
    """This process's slice of the packed global batches of ``sources`` (a list of source dicts): the
    global rows ``rows`` (see :func:`process_rows`), by default the process_index-th block."""
    specs = {s["name"]: (make_source(s, cfg, seed), float(s.get("weight", 1.0))) for s in sources}
    return build_dataset(specs, to_document(cfg), packing_config(cfg), global_batch=cfg.data.global_batch,
                         seed=seed, process_index=jax.process_index(), process_count=jax.process_count(),
                         worker_count=cfg.data.worker_count, max_pending=cfg.data.max_pending, row_ids=rows)


# --- One global batch from many processes. Each process packs only the rows its own devices hold under
# the batch sharding, and jax.make_array_from_process_local_data assembles the global jax.Array.

def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh))


def process_rows(mesh, global_batch: int) -> list[int]:
    """The global batch rows this process's devices hold, in the order its local batch stacks them.

    Processes whose devices hold the same rows (batch replicated across processes, e.g. tensor
    parallelism spanning hosts) read the same rows; all others read disjoint ones.
    """
    rows: dict[int, set[int]] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((global_batch,)).items():
        start, stop, _ = index[0].indices(global_batch)
        rows.setdefault(device.process_index, set()).update(range(start, stop))
    sizes = {p: len(r) for p, r in rows.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the batch sharding gives processes unequal shares of the global batch of {global_batch} "
                         f"rows ({sizes} rows per process); use a mesh with the same devices per process")
    return sorted(rows[jax.process_index()])


def to_global(batch: dict, mesh, global_batch: int) -> dict:
    """This process's rows (numpy) -> the global batch as jax.Arrays sharded like the train step's input."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
            for k, v in batch.items()}


def global_data_state(it, rows: list[int], global_batch: int) -> dict:
    """The data iterator state of the whole global batch (a collective when there are several processes).

    It has the layout of a single process's state, so a checkpoint restores under any process count. With
    ``data.worker_count > 0`` grain's state is not cut by rows: the shards are kept side by side and can be
    restored only by processes that read the same rows.
    """
    local = it.get_state()
    if jax.process_count() == 1:
        return local
    mine = json.dumps({"rows": list(rows), "state": local}).encode()
    parts = {}
    for blob in allgather_bytes(mine):
        part = json.loads(blob)
        parts[tuple(part["rows"])] = part["state"]  # processes holding the same rows hold the same state
    ordered = sorted(parts.items())
    merged = merge_row_states([(list(r), st) for r, st in ordered], global_batch)
    return merged if merged is not None else {"process_shards": [{"rows": list(r), "state": st} for r, st in ordered]}


def local_data_state(state: dict, rows: list[int]) -> dict:
    """This process's share of a state written by :func:`global_data_state` (under any process count)."""
    if "process_shards" not in state:
        return select_row_state(state, rows)
    for shard in state["process_shards"]:
        if list(shard["rows"]) == list(rows):
            return shard["state"]
    raise ValueError(f"the checkpoint's data iterator state was saved with data.worker_count > 0 by processes "
                     f"reading rows {[s['rows'][:1] + ['...'] for s in state['process_shards']]}; this process "
                     f"reads rows {rows}: resume with the same process and device layout, or save with "
                     f"data.worker_count=0 (whose state restores under any layout)")


def log_rows(path: Path, step: int, rows: list[int], batch: dict) -> None:
    """Append which global rows this process fed at ``step`` and a crc32 of each row's tokens."""
    hashes = [zlib.crc32(np.ascontiguousarray(r).tobytes()) for r in np.asarray(batch["tokens"])]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": int(step), "process": jax.process_index(), "rows": list(rows),
                            "token_crc32": hashes}) + "\n")


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
