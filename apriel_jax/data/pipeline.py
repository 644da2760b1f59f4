"""Training input pipeline: weighted sources -> documents -> packed rows -> per-host batches.

Design (why it looks like this):

* **Every row of the global batch is its own stream.** Global row ``r`` (0 <= r < global_batch) packs
  documents drawn only for it: record ``c`` of source ``s`` for row ``r`` is position ``c * R + r`` of
  that source's epoch-wise shuffled order (``index_shuffle``: O(1) memory), so rows never share a
  record within an epoch. A host computes only its rows ``[pi * R/pc, (pi + 1) * R/pc)``, so the global
  batch is the same whatever the process count, and the processes' slices are disjoint.
* **Packing is stateful, and its state is small and explicit.** A row stream keeps, per source, a
  record cursor and the tokens drawn so far, plus ``pending``: pieces that did not fit the row being
  filled, stored as ``(source, record, piece)`` *references*. Restoring re-reads those records (sources
  are random access) and re-splits them, so ``get_state()`` is a few integers per row and a resumed
  iterator yields exactly the batches of an uninterrupted one.
* **Row filling**: pending pieces first, then new documents; a piece that does not fit joins
  ``pending``; the row closes when it is full or ``max_pending`` pieces wait (bounded look-ahead,
  in effect first-fit over a window of documents).
* **Mixture by tokens**: each row stream draws from the source whose ``drawn_tokens / weight`` is
  smallest (deficit round robin). Proportions then track the weights by construction, with no need to
  know average document lengths; realised (packed) proportions are reported in :class:`PipelineStats`.
* **Bad records** are skipped (``on_invalid="skip"``) or stop the pipeline (``"error"``): a record the source
  cannot read (``invalid_json``) or the converter refuses becomes an empty :class:`Document` carrying the
  reason (:mod:`.validate`). Each row counts the records it read and skipped per reason; the counts ride
  along with the row (as the packing statistics do, so they cross worker processes), are summed into
  :class:`PipelineStats` and kept in the iterator's state. Skips depend only on the records, so a resumed
  run skips exactly what an uninterrupted one would.
* **Workers**: rows are grain elements in order (batch t, row k -> element t * B + k); grain's
  ``mp_prefetch`` hands worker w the rows k = w mod W and interleaves them back in order, so the output
  does not depend on ``worker_count`` (which must divide the local batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

import grain
import numpy as np
from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

from .errors import REASONS, DataError, InvalidRecord
from .packing import PackingConfig, PackingStats, Row, rows_to_batch, split_document
from .types import Document
from .validate import SkipLog, check_on_invalid, check_record, convert_or_skip, describe_skips

__all__ = ["ByteTextToDocument", "PipelineStats", "PackedDataset", "build_dataset"]

_STAT_FIELDS = [f.name for f in fields(PackingStats)]
# The "_records" vector of a row: records read, then records skipped per reason.
_RECORD_FIELDS = ("read", *REASONS)


class ByteTextToDocument:
    """Minimal ``to_document`` for tests and smoke runs: UTF-8 bytes + ``offset`` as ids, text records only
    (any other record is an ``InvalidRecord``: the pipeline skips it or stops, as its policy says)."""

    def __init__(self, offset: int = 20):
        self.offset = offset

    def __call__(self, record: dict) -> Document:
        record = check_record(record)
        if "text" not in record:
            raise InvalidRecord(str(record.get("_where", "<record>")), "bad_schema",
                                "byte-level text (no data.tokenizer) takes only {'text': ...} records")
        ids = np.frombuffer(record["text"].encode("utf-8"), np.uint8).astype(np.int32) + self.offset
        mask = np.ones(len(ids), np.float32)
        mask[:1] = 0.0  # the first token has nothing to be predicted from
        return Document(ids, mask)


def _ensure_absl_flags() -> None:
    # grain's worker processes read absl flags; outside absl.app.run they are unparsed and raise.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclass
class _Shared:
    """What every row stream of a dataset needs (pickled into workers once)."""

    names: list[str]
    sources: list[Any]
    weights: np.ndarray
    to_document: Callable[[dict], Document]
    cfg: PackingConfig
    rows_total: int  # global batch: the stride between one row's records
    seed: int
    max_pending: int
    on_invalid: str = "skip"
    skips: SkipLog = field(default_factory=SkipLog)  # per process: logs the first skips of each reason

    def record_index(self, s: int, row: int, cursor: int) -> int:
        n = len(self.sources[s])
        g = cursor * self.rows_total + row
        epoch, pos = divmod(g, n)
        # 32-bit seed per (seed, source, epoch): every epoch reshuffles.
        key = int(np.random.SeedSequence([self.seed, s, epoch]).generate_state(1)[0])
        return int(index_shuffle_module.index_shuffle(pos, n - 1, key, 4))

    def document(self, s: int, rec: int) -> Document:
        """Record ``rec`` of source ``s`` as a Document; a skipped record's is empty and says why."""
        doc = convert_or_skip(lambda: self.to_document(self.sources[s][rec]), self.on_invalid, self.skips)
        doc.source = self.names[s]
        return doc


class _RowStream:
    """Packs successive rows for one global row index; state = cursors, drawn tokens, pending refs."""

    def __init__(self, shared: _Shared, row: int):
        self.sh, self.row = shared, row
        n = len(shared.names)
        self.cursor = [0] * n
        self.drawn = [0] * n
        self.pending: list[tuple[int, int, int]] = []
        self._cache: dict[tuple[int, int], list[Document]] = {}  # pieces of documents with pending pieces

    def state(self) -> dict:
        return {"cursor": list(self.cursor), "drawn": list(self.drawn), "pending": [list(p) for p in self.pending]}

    def restore(self, state: dict) -> None:
        self.cursor, self.drawn = list(state["cursor"]), list(state["drawn"])
        self.pending = [tuple(p) for p in state["pending"]]
        self._cache = {}

    def _pieces(self, s: int, rec: int, stats: PackingStats | None) -> list[Document]:
        key = (s, rec)
        if key not in self._cache:
            # Re-splitting after a restore must not count the document twice.
            self._cache[key] = split_document(self.sh.document(s, rec), self.sh.cfg,
                                              stats if stats is not None else PackingStats())
        return self._cache[key]

    def next_row(self, stats: PackingStats, counts: np.ndarray) -> Row:
        """The next row; its newly read records are counted in ``counts`` (see ``_RECORD_FIELDS``)."""
        sh, cfg = self.sh, self.sh.cfg
        row, waiting = Row(), []
        for s, rec, p in self.pending:
            piece = self._pieces(s, rec, None)[p]
            if row.fits(piece, cfg):
                row.add(piece)
            else:
                waiting.append((s, rec, p))
        empty_draws = 0
        while row.num_tokens < cfg.seq_len and len(waiting) < sh.max_pending:
            s = int(np.argmin(np.asarray(self.drawn, np.float64) / sh.weights))
            rec = sh.record_index(s, self.row, self.cursor[s])
            self.cursor[s] += 1
            doc = sh.document(s, rec)
            counts[0] += 1
            if doc.skip_reason:
                counts[_RECORD_FIELDS.index(doc.skip_reason)] += 1
            pieces = split_document(doc, cfg, stats)
            self._cache[(s, rec)] = pieces
            self.drawn[s] += max(1, sum(len(p) for p in pieces))  # >= 1 so an all-dropped source yields its turn
            empty_draws = empty_draws + 1 if not pieces else 0
            if empty_draws > 10_000:
                skipped = describe_skips(dict(zip(_RECORD_FIELDS[1:], counts[1:].tolist())))
                raise DataError(f"10000 documents in a row were dropped or skipped (skipped records: {skipped}); "
                                "check the data and the packing config")
            for p, piece in enumerate(pieces):
                if row.fits(piece, cfg):
                    row.add(piece)
                else:
                    waiting.append((s, rec, p))
        self.pending = waiting
        live = {(s, rec) for s, rec, _ in waiting}
        self._cache = {k: v for k, v in self._cache.items() if k in live}
        return row


def _row_element(shared: _Shared, row: Row, stats: PackingStats, counts: np.ndarray) -> dict[str, np.ndarray]:
    batch = {k: v[0] for k, v in rows_to_batch([row], shared.cfg).items()}
    per_source = np.zeros(len(shared.names), np.int64)
    for piece in row.pieces:
        per_source[shared.names.index(piece.source)] += len(piece)
    batch["_source_tokens"] = per_source
    batch["_stats"] = np.array([getattr(stats, f) for f in _STAT_FIELDS], np.int64)
    batch["_records"] = counts
    return batch


class _RowsIterator(grain.DatasetIterator):
    def __init__(self, shared: _Shared, row_ids: list[int]):
        super().__init__()
        self.sh = shared
        self.streams = [_RowStream(shared, r) for r in row_ids]
        self.k = 0

    def __next__(self) -> dict[str, np.ndarray]:
        stream = self.streams[self.k % len(self.streams)]
        stats, counts = PackingStats(), np.zeros(len(_RECORD_FIELDS), np.int64)
        row = stream.next_row(stats, counts)
        stats.count_rows([row], self.sh.cfg)
        self.k += 1
        return _row_element(self.sh, row, stats, counts)

    def get_state(self) -> dict:
        return {"k": self.k, "rows": [s.state() for s in self.streams]}

    def set_state(self, state: dict) -> None:
        self.k = int(state["k"])
        for stream, st in zip(self.streams, state["rows"], strict=True):
            stream.restore(st)


class _RowsIterDataset(grain.IterDataset):
    """Source IterDataset of packed rows; supports grain's in-place slicing for worker processes."""

    def __init__(self, shared: _Shared, row_ids: list[int]):
        super().__init__()
        self.sh, self.row_ids = shared, list(row_ids)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        self.row_ids = self.row_ids[sl]

    def __iter__(self) -> _RowsIterator:
        return _RowsIterator(self.sh, self.row_ids)


def _stack_rows(rows):
    """grain batch_fn: stack row arrays; bookkeeping fields are summed, not stacked."""
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0] if not k.startswith("_")}
    out["_source_tokens"] = np.sum([r["_source_tokens"] for r in rows], axis=0)
    out["_stats"] = np.sum([r["_stats"] for r in rows], axis=0)
    out["_records"] = np.sum([r["_records"] for r in rows], axis=0)
    return out


def _no_skips() -> dict[str, int]:
    return dict.fromkeys(REASONS, 0)


@dataclass
class PipelineStats:
    names: list[str]
    weights: list[float]
    source_tokens: list[int] = field(default_factory=list)  # packed tokens per source
    packing: PackingStats = field(default_factory=PackingStats)
    batches: int = 0
    records: int = 0  # records read (skipped ones included)
    skipped: dict[str, int] = field(default_factory=_no_skips)  # records skipped, per reason

    def proportions(self) -> dict[str, float]:
        total = sum(self.source_tokens) or 1
        return {n: t / total for n, t in zip(self.names, self.source_tokens)}

    @property
    def skip_fraction(self) -> float:
        return sum(self.skipped.values()) / self.records if self.records else 0.0

    def add_records(self, counts) -> None:
        """Add a ``_records`` vector (records read, then skipped per reason)."""
        self.records += int(counts[0])
        for reason, n in zip(REASONS, counts[1:]):
            self.skipped[reason] += int(n)

    def state(self) -> dict:
        return {"source_tokens": list(self.source_tokens), "packing": self.packing.as_dict(), "batches": self.batches,
                "records": {"read": self.records, "skipped": dict(self.skipped)}}

    def restore(self, state: dict) -> None:
        self.source_tokens = list(state["source_tokens"])
        self.packing = PackingStats(**state["packing"])
        self.batches = int(state["batches"])
        # States saved before records were counted have no "records": those counts start at zero.
        records = state.get("records") or {}
        self.records = int(records.get("read", 0))
        self.skipped = {r: int((records.get("skipped") or {}).get(r, 0)) for r in REASONS}


class PackedBatchIterator:
    """Iterator of batch-contract dicts for this process, with statistics and checkpointable state."""

    def __init__(self, dataset: "PackedDataset"):
        self._it = iter(dataset.grain_dataset)
        self.stats = PipelineStats(dataset.names, dataset.weights, [0] * len(dataset.names))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.stats.source_tokens = [a + int(b) for a, b in zip(self.stats.source_tokens, batch.pop("_source_tokens"))]
        self.stats.packing.merge(PackingStats(**dict(zip(_STAT_FIELDS, map(int, batch.pop("_stats"))))))
        self.stats.add_records(batch.pop("_records"))
        self.stats.batches += 1
        return batch

    def get_state(self) -> dict:
        return {"grain": self._it.get_state(), "stats": self.stats.state()}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["grain"])
        self.stats.restore(state["stats"])

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


@dataclass
class PackedDataset:
    grain_dataset: grain.IterDataset
    names: list[str]
    weights: list[float]
    local_batch: int
    row_ids: list[int] = field(default_factory=list)  # the global rows this process packs, in batch order

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self)


def build_dataset(sources: Mapping[str, tuple[Any, float]], to_document: Callable[[dict], Document],
                  packing: PackingConfig, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1, worker_count: int = 0, max_pending: int = 8,
                  worker_buffer_size: int = 2, row_ids=None, on_invalid: str = "skip") -> PackedDataset:
    """This process's slice of an infinite stream of packed global batches (see module docstring).

    ``sources`` maps a name to ``(random-access source, weight)``; weights are token proportions
    (normalised here). ``to_document`` must be picklable (a module-level class) when ``worker_count > 0``.
    ``on_invalid``: what an ``InvalidRecord`` raised by a source or by ``to_document`` does (``"skip"``:
    counted per reason in the iterator's ``stats``; ``"error"``: raised).
    The slice is rows ``[pi * R/pc, (pi + 1) * R/pc)``, or exactly ``row_ids`` when given (the rows a
    process's devices hold under the batch sharding, which need not be that block).
    """
    _ensure_absl_flags()
    if row_ids is None:
        if global_batch < 1 or process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad batch/process: global_batch={global_batch} process {process_index}/{process_count}")
        if global_batch % process_count:
            raise ValueError(f"global_batch={global_batch} is not divisible by process_count={process_count}")
        local = global_batch // process_count
        row_ids = range(process_index * local, (process_index + 1) * local)
    row_ids = [int(r) for r in row_ids]
    if not row_ids or len(set(row_ids)) != len(row_ids) or not all(0 <= r < global_batch for r in row_ids):
        raise ValueError(f"row_ids must be distinct rows of the global batch of {global_batch}, got {row_ids}")
    local = len(row_ids)
    if worker_count and local % worker_count:
        raise ValueError(f"worker_count={worker_count} must divide the per-process batch {local}")
    names = list(sources)
    if not names:
        raise ValueError("no sources given")
    weights = np.array([float(sources[n][1]) for n in names], np.float64)
    if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"weights must be positive and finite, got {dict(zip(names, weights))}")
    for n in names:
        if len(sources[n][0]) == 0:
            raise ValueError(f"source {n!r} is empty")
    weights = weights / weights.sum()
    shared = _Shared(names, [sources[n][0] for n in names], weights, to_document, packing,
                     global_batch, int(seed), max_pending, check_on_invalid(on_invalid))
    ds: grain.IterDataset = _RowsIterDataset(shared, row_ids)
    if worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                          per_worker_buffer_size=worker_buffer_size))
    ds = ds.batch(local, drop_remainder=True, batch_fn=_stack_rows)
    return PackedDataset(ds, names, [float(w) for w in weights], local, row_ids)


# --- Iterator state across process layouts. Every global row is its own stream, so the state of the whole
# global batch is just the row states side by side: it can be cut for any other split of the rows.

def merge_row_states(parts: list[tuple[list[int], dict]], global_batch: int) -> dict | None:
    """One iterator state for the whole global batch from ``(row_ids, state)`` of disjoint row shards that
    cover it; it has the layout of a single process's state. None when a part has grain's worker layout
    (``worker_count > 0``), which is not cut by rows."""
    if not all("rows" in state["grain"] for _, state in parts):
        return None
    rows: list = [None] * global_batch
    batches = set()
    for row_ids, state in parts:
        g = state["grain"]
        batches.add(int(g["k"]) // len(row_ids))
        for r, row_state in zip(row_ids, g["rows"], strict=True):
            rows[r] = row_state
    if len(batches) != 1 or any(r is None for r in rows):
        raise ValueError(f"row shards do not cover the global batch of {global_batch} at one batch index "
                         f"(batches {sorted(batches)})")
    stats = [state["stats"] for _, state in parts]
    packing = {k: sum(int(s["packing"][k]) for s in stats) for k in stats[0]["packing"]}
    records = [s.get("records") or {} for s in stats]
    return {"grain": {"k": batches.pop() * global_batch, "rows": rows},
            "stats": {"source_tokens": [int(sum(t)) for t in zip(*(s["source_tokens"] for s in stats))],
                      "packing": packing, "batches": stats[0]["batches"],
                      "records": {"read": sum(int(r.get("read", 0)) for r in records),
                                  "skipped": {k: sum(int((r.get("skipped") or {}).get(k, 0)) for r in records)
                                              for k in REASONS}}}}


def select_row_state(state: dict, row_ids: list[int]) -> dict:
    """The state of an iterator over ``row_ids`` cut from a whole-batch state (:func:`merge_row_states`).
    The statistics go whole to the shard holding row 0 (zeros elsewhere), so merging again sums right."""
    g = state["grain"]
    if "rows" not in g:  # grain's worker layout (worker_count > 0): restorable only as it is
        return state
    global_batch = len(g["rows"])
    row_ids = [int(r) for r in row_ids]
    if row_ids == list(range(global_batch)):
        return state  # the whole batch (one process): unchanged
    if int(g["k"]) % global_batch or not all(0 <= r < global_batch for r in row_ids):
        raise ValueError(f"cannot cut rows {row_ids} from an iterator state of {global_batch} rows")
    stats = state["stats"]
    if 0 not in row_ids:
        stats = {"source_tokens": [0] * len(stats["source_tokens"]),
                 "packing": {k: 0 for k in stats["packing"]}, "batches": stats["batches"],
                 "records": {"read": 0, "skipped": _no_skips()}}
    return {"grain": {"k": int(g["k"]) // global_batch * len(row_ids), "rows": [g["rows"][r] for r in row_ids]},
            "stats": stats}
