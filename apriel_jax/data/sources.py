"""Random-access record sources (``len`` + ``getitem``) that grain can read, and JSONL -> ArrayRecord.

A record is a dict: ``{"text": ...}``, ``{"messages": [...]}`` or ``{"conversations": [...]}`` (the chat
formats of :mod:`.formats`). Images inside messages are either a path (``{"type": "image", "path":
"img.png"}``, relative to the JSONL file) or inline ``{"type": "image", "image_base64": ...}``. Checking
records and turning them into :class:`Document` objects is the job of the ``to_document`` callable given to
the pipeline, not of the sources: a source refuses only what is not a record at all (not JSON, or not an
object with one of the keys above).

Every file may be local or ``gs://`` (see :mod:`apriel_jax.storage`). A source's paths name files, globs
of files, or directories written by :func:`prepare_array_record`; :func:`expand_data_paths` turns them
into the sorted file list a run records (``train.inputs.resolve_data_files``), so a resumed run reads
the same files.

Sources are pickled into grain worker processes, so none keeps an open file handle in its pickled
state: handles are (re)opened lazily in each process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from apriel_jax import storage
from apriel_jax.storage import gcs

from .errors import DataError, InvalidRecord
from .files import LazyFiles, open_for_streaming, parent_dir
from .formats import IMAGE_REFS, RECORD_KEYS
from .image_refs import bad_image, load_part_image, read_part_bytes
from .images import to_rgb
from .lines import scan_lines
from .validate import SkipLog, check_on_invalid, check_record

__all__ = ["DataError", "JsonlSource", "ArrayRecordSource", "TfdsSource", "prepare_array_record",
           "array_record_paths", "expand_data_paths"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def locate(ends: np.ndarray, index) -> tuple[int, int]:
    """(part, position in it) of record ``index`` of parts (shards, row groups) holding ``ends`` records
    cumulatively; IndexError outside them."""
    index, total = int(index), int(ends[-1]) if len(ends) else 0
    if not 0 <= index < total:
        raise IndexError(f"record {index} out of range for {total} records")
    part = int(np.searchsorted(ends, index, side="right"))
    return part, index - (int(ends[part - 1]) if part else 0)


def _as_paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError("no input files given")
    return out


def _parse_record(raw: bytes | str, where: str) -> dict:
    """The JSON object of one line; InvalidRecord naming ``where`` if it is not JSON (``invalid_json``) or not
    an object with a record's key (``bad_schema``)."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidRecord(where, "invalid_json", f"invalid JSON: {err}") from err
    if not isinstance(record, dict) or not any(k in record for k in RECORD_KEYS):
        raise InvalidRecord(where, "bad_schema", f"a record must be a JSON object with "
                            f"{', '.join(repr(k) for k in RECORD_KEYS[:-1])} or {RECORD_KEYS[-1]!r}")
    return record


def _is_record(raw: bytes) -> bool:
    """Whether ``raw`` parses as a record (:func:`_parse_record` says why not, naming the place)."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and any(k in record for k in RECORD_KEYS)


# ------------------------------------------------------------------------------------- file lists


def array_record_paths(out_dir) -> list[str]:
    """Shard paths listed by the ``manifest.json`` of a :func:`prepare_array_record` output directory.

    The manifest is written last, so a directory without one is an interrupted (incomplete) prepare,
    which is refused rather than read in part.
    """
    out = storage.location(out_dir)
    try:
        manifest = json.loads(storage.read_text(out / MANIFEST))
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(out_dir)}: no {MANIFEST}: not an `apriel-jax data prepare` output, or an "
                                "incomplete one (interrupted before its manifest was written)") from None
    return [os.fspath(out / shard["path"]) for shard in manifest["shards"]]


def expand_data_paths(paths, *, what: str = "data files", allow_prepared: bool = True) -> list[str]:
    """The files that ``paths`` name, in order: each entry a file, a glob (its matches sorted by name) or,
    with ``allow_prepared``, a :func:`prepare_array_record` output directory (its shards, by its
    manifest). Local or ``gs://``. A glob that matches nothing, a missing file and a directory without
    a manifest are errors naming the entry."""
    out: list[str] = []
    for entry in _as_paths(paths):
        if storage.has_glob(entry):
            out.extend(storage.expand_patterns(entry, what=what))
            continue
        loc = storage.location(entry)
        with storage.storage_errors(loc, "read"):
            directory = (loc / MANIFEST).is_file() or loc.is_dir()
        if directory and not allow_prepared:
            raise DataError(f"{what}: {entry} is a directory; give files or a glob (e.g. {entry.rstrip('/')}/*.jsonl)")
        if directory:
            out.extend(array_record_paths(entry))
            continue
        out.extend(storage.expand_patterns(entry, what=what))
    return out


# ------------------------------------------------------------------------------------------ JSONL


class JsonlSource:
    """Records of one or more JSONL files (local or ``gs://``), one per non-blank line.

    The line index (where each record starts) is built at construction by a vectorised scan for
    newlines (:mod:`.lines`), reading each file once in chunks. ``on_error`` says what else happens:

    * ``"raise"`` (default): every line is also parsed now, and the first bad one raises a
      :class:`DataError` naming file:line (a bad file fails before a long job starts);
    * ``"skip"``: every line is parsed now; bad lines are left out and counted in ``skipped`` (their
      locations in ``skipped_locations``);
    * ``"defer"`` (training, where every host builds the index at start-up): nothing is parsed now; a
      record is parsed when it is read, and a bad line raises its :class:`DataError` then.

    Reading a record reads exactly its bytes: a seek and a read locally, one range request on GCS,
    through handles each process opens on first use. Each record gets ``"_dir"`` (its file's folder,
    to resolve image paths) and ``"_where"`` ("file:line", for error messages downstream).
    """

    def __init__(self, paths, on_error: str = "raise"):
        if on_error not in ("raise", "skip", "defer"):
            raise ValueError(f"on_error must be 'raise', 'skip' or 'defer', got {on_error!r}")
        self.paths = _as_paths(paths)
        self.on_error = on_error
        self.skipped_locations: list[str] = []
        file_ids, starts, numbers, sizes = [], [], [], []
        for f, path in enumerate(self.paths):
            s, n, size = self._index(path)
            file_ids.append(np.full(len(s), f, np.int32))
            starts.append(s)
            numbers.append(n)
            sizes.append(size)
        # Compact arrays: cheap to pickle into workers even for millions of lines.
        self._file = np.concatenate(file_ids)
        self._start = np.concatenate(starts).astype(np.int64)
        self._line = np.concatenate(numbers).astype(np.int64)
        self._size = np.asarray(sizes, np.int64)
        self._files = LazyFiles(self.paths)

    def _index(self, path: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(start offsets, line numbers) of the records of ``path``, and its size in bytes."""
        starts, numbers = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        with open_for_streaming(path) as fh:
            for chunk in scan_lines(fh, keep_text=self.on_error != "defer"):
                keep = np.ones(len(chunk), bool)
                if self.on_error != "defer":
                    for k, raw in enumerate(chunk.texts()):
                        if _is_record(raw):
                            continue
                        where = f"{path}:{int(chunk.numbers[k])}"
                        if self.on_error == "raise":
                            _parse_record(raw, where)  # raises the error naming the line
                        self.skipped_locations.append(where)
                        keep[k] = False
                starts.append(chunk.starts[keep])
                numbers.append(chunk.numbers[keep])
            size = fh.tell()
        return np.concatenate(starts), np.concatenate(numbers), size

    @property
    def skipped(self) -> int:
        return len(self.skipped_locations)

    def __len__(self) -> int:
        return len(self._start)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        f, start = int(self._file[index]), int(self._start[index])
        # The record ends at its newline; the next record of the file (or the file's end) bounds the read.
        same_file_next = index + 1 < len(self) and int(self._file[index + 1]) == f
        stop = int(self._start[index + 1]) if same_file_next else int(self._size[f])
        raw = self._files.read(f, start, stop - start)
        newline = raw.find(b"\n")
        return self._annotate(_parse_record(raw if newline < 0 else raw[:newline], self._where(index)), f,
                              self._where(index))

    def _where(self, index: int) -> str:
        return f"{self.paths[int(self._file[index])]}:{int(self._line[index])}"

    def _annotate(self, record: dict, f: int, where: str) -> dict:
        record["_dir"] = parent_dir(self.paths[f])
        record["_where"] = where
        return record

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} files, {len(self)} records)"


# ------------------------------------------------------------------------------------ ArrayRecord


def _open_reader(path: str):
    """An ArrayRecord reader of ``path`` set up for random access; a clear error when it cannot open."""
    from array_record.python import array_record_module  # local: optional dependency

    # Random access: no read-ahead, small buffers (grain's own ArrayRecordDataSource does the same).
    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0",
                                                   file_reader_buffer_size=32768)
    if reader.ok():
        return reader
    reader.close()
    # The reader says only "not ok" (a missing object reads as an empty file): ask storage what is wrong.
    loc = storage.location(path)
    with storage.storage_errors(loc, "read"):
        exists = loc.is_file()
    if not exists:
        raise FileNotFoundError(f"{path}: no such ArrayRecord shard")
    raise storage.StorageError(f"{path}: cannot open as an ArrayRecord shard (not ArrayRecord, or unreadable)")


class ArrayRecordSource:
    """Records stored as JSON bytes in ArrayRecord shards (as written by :func:`prepare_array_record`),
    local or ``gs://`` (array_record's reader reads GCS itself).

    Opening counts each shard's records (shards are opened in parallel threads). A read that fails
    (a shard deleted or unreachable mid-run) is retried ``retries`` times with exponential backoff from
    ``backoff_s``, reopening the shard each time; then a :class:`~apriel_jax.storage.StorageError` names
    the shard and the record, and the training loop stops with its I/O exit code.
    """

    def __init__(self, paths, retries: int = 4, backoff_s: float = 1.0):
        self.paths = _as_paths(paths)
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        for path in self.paths:
            if storage.is_remote(path):
                storage.location(path)  # points the C++ reader at the emulator, if one is configured
        with ThreadPoolExecutor(max_workers=min(32, len(self.paths))) as pool:
            counts = list(pool.map(self._count, self.paths))
        self._ends = np.cumsum(np.asarray(counts, np.int64))
        self._len = int(self._ends[-1])
        self._init_readers()

    @staticmethod
    def _count(path: str) -> int:
        reader = _open_reader(path)
        try:
            return int(reader.num_records())
        finally:
            reader.close()

    def _init_readers(self) -> None:
        self._readers: dict[int, object] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        shard, position = locate(self._ends, index)
        where = f"{self.paths[shard]}#record {position}"
        record = _parse_record(self._read(shard, position, where), where)
        record["_where"] = where
        return record

    def _read(self, shard: int, position: int, where: str) -> bytes:
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._reader(shard).read([position])[0]
            except (RuntimeError, OSError) as err:  # the reader raises RuntimeError for I/O failures
                last = err
                self._drop(shard)
                log.warning("%s: read failed (attempt %d of %d): %s", where, attempt + 1, self.retries + 1,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise storage.StorageError(f"{where}: unreadable after {self.retries + 1} attempts: "
                                   f"{str(last).splitlines()[0] if str(last) else type(last).__name__}") from last

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            with self._lock:
                reader = self._readers.get(shard)
                if reader is None:
                    reader = self._readers[shard] = _open_reader(self.paths[shard])
        return reader

    def _drop(self, shard: int) -> None:
        with self._lock:
            reader = self._readers.pop(shard, None)
        if reader is not None:
            with contextlib.suppress(Exception):
                reader.close()

    def __getstate__(self):
        # Readers are per process: workers reopen the shards they read.
        return {"paths": self.paths, "retries": self.retries, "backoff_s": self.backoff_s, "_ends": self._ends,
                "_len": self._len}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_readers()

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, {self._len} records)"


# ------------------------------------------------------------------------------------------- TFDS


class TfdsSource:
    """A TFDS split read through ``tfds.data_source`` (random access, no tensorflow needed).

    ``name_or_dir`` is a registered dataset name (optionally with ``data_dir``) or the directory of a
    prepared builder (``.../name/config/version``, local or ``gs://``). Each example becomes a record
    by the table-row mapping of :mod:`.columns` (``text`` / ``messages`` features, image bytes in an
    ``image(s)`` feature; names configurable through ``columns``).
    """

    def __init__(self, name_or_dir: str, split: str, data_dir: str | None = None, columns=None):
        import tensorflow_datasets as tfds

        from .columns import Columns

        self.name_or_dir, self.split, self.data_dir = os.fspath(name_or_dir), split, data_dir
        self.columns = columns or Columns()
        if storage.is_remote(self.name_or_dir) or os.path.isdir(self.name_or_dir):
            builder = tfds.builder_from_directory(os.fspath(storage.location(self.name_or_dir)))
            self._source = builder.as_data_source(split=split)
        else:
            self._source = tfds.data_source(self.name_or_dir, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        from .columns import row_to_record

        return row_to_record(dict(self._source[int(index)]), f"tfds {self.name_or_dir}[{self.split}]#{index}",
                             self.columns)

    def __getstate__(self):
        return {"name_or_dir": self.name_or_dir, "split": self.split, "data_dir": self.data_dir,
                "columns": self.columns}

    def __setstate__(self, state):
        self.__init__(state["name_or_dir"], state["split"], state["data_dir"], state["columns"])


# --------------------------------------------------------------------------------------- prepare

# Records are checked, and their images read, this many at a time in parallel: on GCS each image is a request.
_BATCH = 64
_THREADS = 16


def prepare_array_record(jsonl_paths: Sequence[str] | str, out_dir: str, records_per_shard: int = 10_000,
                         on_invalid: str = "error", prefix: str = "data", overwrite: bool = False) -> dict:
    """Convert JSONL files (+ the image files they reference) into self-contained ArrayRecord shards.

    Inputs are files or globs, local or ``gs://``, as are the images; ``out_dir`` is local or ``gs://``.
    Two passes over the input:

    1. every record is checked as training would check it (:func:`~apriel_jax.data.validate.check_record`:
       the formats users bring are converted, every field checked) and every image is read and decoded.
       With ``on_invalid="error"`` the first bad record raises its one-line
       :class:`~apriel_jax.data.errors.InvalidRecord` (file:line, what, reason) before anything is
       written; with ``"skip"`` bad records are left out and counted per reason.
    2. the records that passed are written in their native form with every image embedded as base64
       (each image file is read a second time here, rather than held in memory).

    Writes ``{prefix}-00000-of-000NN.array_record`` shards, then ``manifest.json`` **last**: readers trust
    the directory only with its manifest (see :func:`apriel_jax.storage.new_directory`). Locally the
    directory is assembled under a temporary name and renamed into place; on GCS each shard is written to
    a local temporary file (array_record writes local files only) and uploaded as soon as it is complete.
    An existing non-empty ``out_dir`` is an error unless ``overwrite``, which replaces it whole. A prepare
    that fails or is killed leaves an existing output as it was, with one exception: on GCS, where
    objects cannot be renamed into place, an overwrite that fails or is killed while writing (after the
    checks) leaves objects without a manifest, which readers refuse.

    Returns the manifest: ``records``, ``shards`` (path and record count of each), ``skipped`` (total),
    ``skipped_reasons`` (reason -> count), ``skipped_records`` (the first 100 one-line messages) and
    ``without_assistant_turn`` (chats that training with the loss on responses would skip).
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    check_on_invalid(on_invalid)
    out = storage.location(out_dir)
    with storage.storage_errors(out, "list"):
        # Checked again when the directory is written; asked first so that a long check is not wasted.
        if not overwrite and out.is_dir() and any(True for _ in out.iterdir()):
            raise FileExistsError(f"{os.fspath(out)}: exists and is not empty; allow overwriting to replace it")
    inputs = expand_data_paths(jsonl_paths, what="data prepare inputs", allow_prepared=False)
    check = _check_inputs(inputs, on_invalid)
    n = check.kept
    num_shards = max(1, -(-n // records_per_shard))
    remote = storage.is_remote(out)
    shards = []
    with storage.new_directory(out, marker=MANIFEST, overwrite=overwrite) as target, \
            (tempfile.TemporaryDirectory(prefix="apriel-prepare-") if remote
             else contextlib.nullcontext(os.fspath(target))) as work, \
            ThreadPoolExecutor(_THREADS) as pool:
        records = _stored_records(inputs, check.keep, pool)
        for s in range(num_shards):
            name = f"{prefix}-{s:05d}-of-{num_shards:05d}.array_record"
            count = _write_shard(os.path.join(work, name), records, min(records_per_shard, n - s * records_per_shard))
            if remote:
                _upload(os.path.join(work, name), target / name)
            shards.append({"path": name, "records": count})
        if next(records, None) is not None:
            raise DataError(f"the input files changed while `data prepare` read them (more records than the "
                            f"{n} checked)")
        manifest = {"format": "apriel-jax/jsonl-records/v1", "records": n, "skipped": check.skips.total,
                    "skipped_reasons": {r: c for r, c in check.skips.counts.items() if c},
                    "skipped_records": check.messages, "without_assistant_turn": check.without_assistant,
                    "shards": shards}
        storage.write_json(target / MANIFEST, manifest, indent=1, sort_keys=False)
    return manifest


def _lines(paths: list[str]) -> Iterator[tuple[str, str, bytes]]:
    """(folder of the file, "file:line", bytes) of every non-blank line of the files, in order."""
    for path in paths:
        base_dir = parent_dir(path)
        with open_for_streaming(path) as fh:
            for chunk in scan_lines(fh, keep_text=True):
                for number, raw in zip(chunk.numbers.tolist(), chunk.texts()):
                    yield base_dir, f"{path}:{number}", raw


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _native(line: tuple[str, str, bytes]) -> dict:
    """The checked native record of one input line (InvalidRecord if it has none)."""
    base_dir, where, raw = line
    record = _parse_record(raw, where)
    record["_dir"], record["_where"] = base_dir, where
    return check_record(record)


def _image_parts(record: dict) -> Iterator[tuple[str, dict]]:
    """("message i, part j", part) of every image part of a checked native record."""
    for i, message in enumerate(record.get("messages") or []):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if part["type"] == "image":
                yield f"message {i}, part {j}", part


@dataclass
class _Check:
    """The outcome of the first pass: which lines to keep, and what was skipped."""

    keep: bytearray = field(default_factory=bytearray)  # per non-blank input line, in order: 1 = write it
    skips: SkipLog = field(default_factory=SkipLog)
    messages: list[str] = field(default_factory=list)  # the first 100 skipped records' one-line messages
    without_assistant: int = 0

    @property
    def kept(self) -> int:
        return sum(self.keep)


def _check_inputs(paths: list[str], on_invalid: str) -> _Check:
    """First pass of :func:`prepare_array_record`: every record checked, every image read and decoded."""

    def check(line) -> InvalidRecord | bool:
        """The record's error, or whether it is a chat without an assistant turn."""
        try:
            record = _native(line)
            for what, part in _image_parts(record):
                image = load_part_image(part, record["_dir"], what, record["_where"])
                with bad_image(what, "decoded", record["_where"]):
                    to_rgb(image)  # the conversions (and checks) preprocessing applies
        except InvalidRecord as err:
            return err
        return "messages" in record and not any(m["role"] == "assistant" for m in record["messages"])

    out = _Check()
    with ThreadPoolExecutor(_THREADS) as pool:
        for batch in _batches(_lines(paths), _BATCH):
            for verdict in pool.map(check, batch):  # in input order: the first bad record is the one reported
                if isinstance(verdict, InvalidRecord):
                    if on_invalid == "error":
                        raise verdict
                    out.skips.add(verdict)
                    if len(out.messages) < 100:
                        out.messages.append(str(verdict))
                else:
                    out.without_assistant += verdict
                out.keep.append(not isinstance(verdict, InvalidRecord))
    return out


def _stored_records(paths: list[str], keep: bytearray, pool: ThreadPoolExecutor) -> Iterator[bytes]:
    """Second pass: JSON bytes of each kept record in native form with its images embedded, in order."""

    def encode(line) -> bytes:
        try:
            record = _native(line)
            for what, part in _image_parts(record):
                if "image_base64" not in part:
                    data = read_part_bytes(part, record["_dir"], what, record["_where"])
                    for key in IMAGE_REFS:
                        part.pop(key, None)
                    part["image_base64"] = base64.b64encode(data).decode("ascii")
        except InvalidRecord as err:
            raise DataError(f"the input files changed while `data prepare` read them: {err}") from err
        del record["_dir"], record["_where"]
        return json.dumps(record).encode("utf-8")

    def kept_lines():
        for k, line in enumerate(_lines(paths)):
            if k >= len(keep) or keep[k]:  # a line past the checked ones is reported by the caller
                yield line

    for batch in _batches(kept_lines(), _BATCH):
        yield from pool.map(encode, batch)


def _write_shard(path: str, records: Iterator[bytes], count: int) -> int:
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    written = 0
    try:
        for data in records:
            writer.write(data)
            written += 1
            if written == count:
                break
    finally:
        writer.close()
    if written < count:  # the second pass found fewer valid lines than the first
        raise DataError(f"the input files changed while `data prepare` read them ({path}: {written} of {count} "
                        "records)")
    return written


def _upload(local: str, target) -> None:
    """Upload one finished shard (a single object upload: all or nothing), then free the local disk."""
    with storage.storage_errors(target, "write"):
        gcs.filesystem().put_file(local, os.fspath(target))
    os.remove(local)
