"""Data sources of a run config -> the packed, checkpointable batch iterator of the training loop.

Without ``data.tokenizer`` text is byte-tokenized (``ByteTextToDocument``): no tokenizer file is needed, so
a run config is self-contained. With a tokenizer, records (text, chat, images, synthetic visual tasks) go
through ``RecordToDocument`` and the packer takes its special ids from that tokenizer.

File-backed sources name their files by ``paths`` (files, globs, ``data prepare`` directories; local or
``gs://``). :func:`resolve_data_files` expands them once per run into each source's ``files``, which the
run config (and so every checkpoint) records: a resumed run reads the files it started with.

Malformed records are skipped (``data.on_invalid="skip"``) or stop the run (``"error"``), each named by
file:line and reason. :func:`data_health` reads the counts (records read, skipped per reason) from the
iterator, and :func:`check_skip_fraction` stops a run whose skip fraction passes
``data.max_skip_fraction`` once ``data.skip_check_after`` records have been read.
"""

from __future__ import annotations

import json
import logging
import zlib

import jax
import numpy as np
from jax.sharding import NamedSharding

from apriel_jax.data.errors import REASONS, DataError
from apriel_jax.data.images import ImageConfig
from apriel_jax.data.packing import PackingConfig
from apriel_jax.data.pipeline import (
    ByteTextToDocument,
    build_dataset,
    merge_row_states,
    select_row_state,
)
from apriel_jax.data.records import RecordToDocument, resolve_tokenizer_path
from apriel_jax.data.sources import ArrayRecordSource, JsonlSource, expand_data_paths
from apriel_jax.data.synthetic import TaskMixture
from apriel_jax.data.synthetic.text import SyntheticReasoningChats, SyntheticText
from apriel_jax.data.tokenizer import load_tokenizer
from apriel_jax.data.validate import describe_skips
from apriel_jax.parallel.distributed import allgather_bytes
from apriel_jax.parallel.rules import logical_to_spec
from apriel_jax.storage import read_text
from apriel_jax.train.config import FILE_SOURCE_KINDS

log = logging.getLogger(__name__)

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
        texts = [read_text(p) for p in paths] if paths else [text or BUILTIN_TEXT]
        self.paragraphs = [p.strip() for t in texts for p in t.split("\n\n") if p.strip()]

    def __len__(self) -> int:
        return len(self.paragraphs)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.paragraphs[i]}


def synthetic_image_size(spec: dict) -> int:
    """Side in pixels of the square images of a ``synthetic`` source (option ``image_size``, default 256)."""
    return int((spec.get("options") or {}).get("image_size", 256))


def source_files(spec: dict) -> list[str]:
    """The sorted files a file-backed source's ``paths`` name now (see :func:`expand_data_paths`)."""
    return expand_data_paths(spec["paths"], what=f"source {spec['name']!r}",
                             allow_prepared=spec["kind"] == "array_record")


def resolve_data_files(cfg, recorded: dict | None = None) -> None:
    """Fill each file-backed source of cfg.data.sources and cfg.eval.sources with "files": the sorted list its
    "paths" expand to (globs, lists, prepared directories; local or gs://). With `recorded` (the run config
    dict saved in a checkpoint's meta), a source whose name and paths match the recorded one takes the
    recorded files instead of expanding again, so a resumed run reads the same files even if the bucket
    changed (say so in one log/warning line when the listing now differs)."""
    for section in ("data", "eval"):
        before = {s["name"]: s for s in ((recorded or {}).get(section) or {}).get("sources") or []}
        for spec in cfg[section].sources:
            if spec["kind"] not in FILE_SOURCE_KINDS or not spec.get("paths"):
                continue
            old = before.get(spec["name"])
            same = (old is not None and old.get("kind") == spec["kind"] and old.get("files")
                    and [str(p) for p in old.get("paths") or []] == [str(p) for p in spec["paths"]])
            if not same:
                spec["files"] = source_files(spec)
                continue
            spec["files"] = list(old["files"])
            try:
                now = source_files(spec)
            except FileNotFoundError as err:
                log.warning("%s.sources %r: %s; reading the %d files this run started with",
                            section, spec["name"], err, len(spec["files"]))
                continue
            if now != spec["files"]:
                added, gone = len(set(now) - set(spec["files"])), len(set(spec["files"]) - set(now))
                log.warning("%s.sources %r: its paths now match %d files (%d new, %d gone); reading the %d files "
                            "this run started with", section, spec["name"], len(now), added, gone,
                            len(spec["files"]))


def make_source(spec: dict, cfg, seed: int):
    kind = spec["kind"]
    opts = dict(spec.get("options") or {})
    if kind in FILE_SOURCE_KINDS and spec.get("paths"):
        files = list(spec.get("files") or source_files(spec))
    else:
        files = []
    if kind == "bytes_text":
        return ParagraphSource(files)
    if kind == "jsonl":
        return JsonlSource(files, on_error="defer")  # every host indexes at start-up: no parsing there
    if kind == "array_record":
        return ArrayRecordSource(files)
    if kind == "parquet":
        from apriel_jax.data.columns import Columns
        from apriel_jax.data.parquet import ParquetSource

        return ParquetSource(files, Columns.from_options(opts))
    if kind == "tfds":
        from apriel_jax.data.columns import Columns
        from apriel_jax.data.sources import TfdsSource

        return TfdsSource(spec["paths"][0], opts.get("split", "train"), opts.get("data_dir") or None,
                          Columns.from_options(opts))
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
                            patch_budget=cfg.data.patch_budget or None, on_invalid=cfg.data.on_invalid)


def make_dataset(cfg, sources, seed: int, rows=None):
    """This process's slice of the packed global batches of ``sources`` (a list of source dicts): the
    global rows ``rows`` (see :func:`process_rows`), by default the process_index-th block."""
    specs = {s["name"]: (make_source(s, cfg, seed), float(s.get("weight", 1.0))) for s in sources}
    return build_dataset(specs, to_document(cfg), packing_config(cfg), global_batch=cfg.data.global_batch,
                         seed=seed, process_index=jax.process_index(), process_count=jax.process_count(),
                         worker_count=cfg.data.worker_count, max_pending=cfg.data.max_pending, row_ids=rows,
                         on_invalid=cfg.data.on_invalid)


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


def data_health(it, rows: list[int] | None = None) -> dict[str, float]:
    """``{"records": n, "skipped/<reason>": k for every reason, "skip_fraction": f}`` of the records the
    iterator ``it`` has read so far (over the whole run: the counts are part of its checkpointed state).

    Without ``rows`` the counts are this process's. With ``rows`` (this process's global rows, as given to
    :func:`make_dataset`) they are summed over all processes, counting processes that read the same rows
    once: the same numbers on every process. That is a collective: every process must call it at the
    same step.
    """
    stats = it.stats
    counts = {"records": stats.records, **{f"skipped/{r}": stats.skipped[r] for r in REASONS}}
    if rows is not None and jax.process_count() > 1:
        parts = {}
        for blob in allgather_bytes(json.dumps({"rows": list(rows), "counts": counts}).encode()):
            part = json.loads(blob)
            parts[tuple(part["rows"])] = part["counts"]
        counts = {k: sum(p[k] for p in parts.values()) for k in counts}
    skipped = sum(v for k, v in counts.items() if k.startswith("skipped/"))
    health = {k: float(v) for k, v in counts.items()}
    health["skip_fraction"] = skipped / counts["records"] if counts["records"] else 0.0
    return health


def skip_summary(health: dict[str, float]) -> str:
    """One line for the end of a run, e.g. ``"12000 records read, 37 skipped (0.31%): bad_schema 30,
    unreadable_image 7"``."""
    counts = {r: int(health[f"skipped/{r}"]) for r in REASONS}
    text = f"{int(health['records'])} records read, {sum(counts.values())} skipped"
    if not any(counts.values()):
        return text
    return f"{text} ({health['skip_fraction']:.2%}): {describe_skips(counts)}"


def check_skip_fraction(cfg, health: dict[str, float]) -> None:
    """Raise DataError (one line: the counts per reason and the setting to change) when more than
    ``data.max_skip_fraction`` of the records read were skipped, once ``data.skip_check_after`` records have
    been read (so that 1 bad record of the first 3 does not stop a run). ``max_skip_fraction=1`` never stops."""
    limit = float(cfg.data.max_skip_fraction)
    records = int(health["records"])
    if limit >= 1.0 or records < cfg.data.skip_check_after or health["skip_fraction"] <= limit:
        return
    per_reason = describe_skips({r: int(health[f"skipped/{r}"]) for r in REASONS})
    skipped = sum(int(health[f"skipped/{r}"]) for r in REASONS)
    raise DataError(f"{skipped} of the {records} records read were skipped ({health['skip_fraction']:.1%}, more than "
                    f"data.max_skip_fraction={limit:g}): {per_reason}; the warnings name the first records of each "
                    "reason; fix the data, or raise data.max_skip_fraction")


def log_rows(rows_log, step: int, rows: list[int], batch: dict) -> None:
    """Append to ``rows_log`` (a :class:`apriel_jax.storage.AppendLog`) which global rows this process fed
    at ``step`` and a crc32 of each row's tokens."""
    hashes = [zlib.crc32(np.ascontiguousarray(r).tobytes()) for r in np.asarray(batch["tokens"])]
    rows_log.write(json.dumps({"step": int(step), "process": jax.process_index(), "rows": list(rows),
                               "token_crc32": hashes}))


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
