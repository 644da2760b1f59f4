"""Random-access record sources (``len`` + ``getitem``) that grain can read, plus JSONL -> ArrayRecord.

A record is a dict: ``{"text": ...}`` or ``{"messages": [...]}``. Images inside messages are either a
path (``{"type": "image", "path": "img.png"}``, relative to the JSONL file) or inline
``{"type": "image", "image_base64": ...}``. Turning records into :class:`Document`s is the job of the
``to_document`` callable given to the pipeline, not of the sources.

Sources are pickled into grain worker processes, so none keeps an open file handle in its pickled
state: handles are (re)opened lazily in each process.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["DataError", "JsonlSource", "ArrayRecordSource", "TfdsSource", "prepare_array_record",
           "embed_images"]


class DataError(ValueError):
    """A record cannot be read; the message names the file and (1-based) line or record number."""


def _as_paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError("no input files given")
    return out


def _parse_record(raw: bytes | str, where: str) -> dict:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: invalid JSON: {err}") from err
    if not isinstance(record, dict) or not ("text" in record or "messages" in record):
        raise DataError(f"{where}: a record must be an object with 'text' or 'messages'")
    return record


class JsonlSource:
    """Records of one or more JSONL files, one per non-blank line.

    The line-offset index is built once, at construction, and every line is parsed then, so a bad line
    fails the run immediately (``on_error="raise"``, the default) rather than hours into training; with
    ``on_error="skip"`` bad lines are left out and counted in ``skipped`` (their locations in
    ``skipped_locations``). Each record gets ``"_dir"`` (its file's folder, to resolve image paths)
    and ``"_where"`` ("file:line", for error messages downstream).
    """

    def __init__(self, paths, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.paths = _as_paths(paths)
        self.skipped_locations: list[str] = []
        file_ids, offsets, lines = [], [], []
        for f, path in enumerate(self.paths):
            with open(path, "rb") as fh:
                pos = 0
                for lineno, raw in enumerate(fh, start=1):
                    if raw.strip():
                        try:
                            _parse_record(raw, f"{path}:{lineno}")
                        except DataError:
                            if on_error == "raise":
                                raise
                            self.skipped_locations.append(f"{path}:{lineno}")
                        else:
                            file_ids.append(f)
                            offsets.append(pos)
                            lines.append(lineno)
                    pos += len(raw)
        # Compact arrays: cheap to pickle into workers even for millions of lines.
        self._file = np.asarray(file_ids, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._line = np.asarray(lines, np.int64)
        self._handles: dict[int, Any] = {}

    @property
    def skipped(self) -> int:
        return len(self.skipped_locations)

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        f = int(self._file[index])
        fh = self._handles.get(f)
        if fh is None:
            fh = self._handles[f] = open(self.paths[f], "rb")
        fh.seek(int(self._offset[index]))
        where = f"{self.paths[f]}:{int(self._line[index])}"
        record = _parse_record(fh.readline(), where)
        record["_dir"] = os.path.dirname(os.path.abspath(self.paths[f]))
        record["_where"] = where
        return record

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} files, {len(self)} records)"


class ArrayRecordSource:
    """Records stored as JSON bytes in ArrayRecord shards (as written by :func:`prepare_array_record`)."""

    def __init__(self, paths):
        from array_record.python import array_record_data_source  # local: optional dependency

        self.paths = _as_paths(paths)
        self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
        self._len = len(self._source)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"record {index} out of range for {self._len} records")
        record = _parse_record(self._source[index], f"{self._where(index)}")
        record["_where"] = self._where(index)
        return record

    def _where(self, index: int) -> str:
        return f"{', '.join(self.paths) if len(self.paths) == 1 else 'array_record shards'}#record {index}"

    def __getstate__(self):
        # ArrayRecordDataSource pickles itself by paths, but keep ours explicit and light.
        return {"paths": self.paths, "_len": self._len}

    def __setstate__(self, state):
        from array_record.python import array_record_data_source

        self.__dict__.update(state)
        self._source = array_record_data_source.ArrayRecordDataSource(self.paths)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, {self._len} records)"


class TfdsSource:
    """A TFDS split read through ``tfds.data_source`` (random access, no tensorflow needed).

    ``name_or_dir`` is a registered dataset name (optionally with ``data_dir``) or the directory of a
    prepared builder (``.../name/config/version``). Records are the feature dicts TFDS returns; bytes
    values are decoded to str so ``{"text": b"..."}`` works like JSONL.
    """

    def __init__(self, name_or_dir: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.name_or_dir, self.split, self.data_dir = os.fspath(name_or_dir), split, data_dir
        if os.path.isdir(self.name_or_dir):
            builder = tfds.builder_from_directory(self.name_or_dir)
            self._source = builder.as_data_source(split=split)
        else:
            self._source = tfds.data_source(self.name_or_dir, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._source[int(index)])
        for key, value in record.items():
            if isinstance(value, bytes) and key in ("text",):
                record[key] = value.decode("utf-8")
        record["_where"] = f"tfds {self.name_or_dir}[{self.split}]#{index}"
        return record

    def __getstate__(self):
        return {"name_or_dir": self.name_or_dir, "split": self.split, "data_dir": self.data_dir}

    def __setstate__(self, state):
        self.__init__(state["name_or_dir"], state["split"], state["data_dir"])


def embed_images(record: dict, base_dir: str, where: str) -> dict:
    """Copy of ``record`` with every image path replaced by inline base64, so it is self-contained."""

    def visit(node):
        if isinstance(node, dict):
            node = {k: visit(v) for k, v in node.items()}
            if node.get("type") == "image" and "image_base64" not in node:
                ref = node.pop("path", None) or node.pop("image", None)
                if not isinstance(ref, str):
                    raise DataError(f"{where}: image entry has neither 'path' nor 'image_base64'")
                path = ref if os.path.isabs(ref) else os.path.join(base_dir, ref)
                try:
                    node["image_base64"] = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                except OSError as err:
                    raise DataError(f"{where}: cannot read image {path!r}: {err}") from err
            return node
        if isinstance(node, list):
            return [visit(v) for v in node]
        return node

    return visit(record)


def prepare_array_record(jsonl_paths: Sequence[str] | str, out_dir: str, records_per_shard: int = 10_000,
                         on_error: str = "raise", prefix: str = "data") -> dict:
    """Convert JSONL files (+ the image files they reference) into self-contained ArrayRecord shards.

    Writes ``{prefix}-00000-of-000NN.array_record`` shards and ``manifest.json`` with the record count of
    each shard; returns the manifest. Bad lines raise a :class:`DataError` naming file:line, or are
    skipped and counted (``"skipped"`` in the manifest) with ``on_error="skip"``.
    """
    from array_record.python import array_record_module

    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    source = JsonlSource(jsonl_paths, on_error=on_error)
    n = len(source)
    num_shards = max(1, -(-n // records_per_shard))
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    for s in range(num_shards):
        name = f"{prefix}-{s:05d}-of-{num_shards:05d}.array_record"
        writer = array_record_module.ArrayRecordWriter(os.path.join(out_dir, name), "group_size:1")
        count = 0
        try:
            for i in range(s * records_per_shard, min(n, (s + 1) * records_per_shard)):
                record = source[i]
                base_dir, where = record.pop("_dir"), record.pop("_where")
                writer.write(json.dumps(embed_images(record, base_dir, where)).encode("utf-8"))
                count += 1
        finally:
            writer.close()
        shards.append({"path": name, "records": count})
    manifest = {"format": "apriel-jax/jsonl-records/v1", "records": n, "skipped": source.skipped,
                "skipped_locations": source.skipped_locations[:100], "shards": shards}
    with open(os.path.join(out_dir, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def array_record_paths(out_dir: str) -> list[str]:
    """Shard paths listed by a ``manifest.json`` written by :func:`prepare_array_record`."""
    with open(os.path.join(out_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    return [os.path.join(out_dir, shard["path"]) for shard in manifest["shards"]]
