"""Streaming, validating reader/writer for the safetensors checkpoint format.

Why not just ``safetensors.numpy.load_file``: it materialises every tensor of a
file in host memory and its errors do not say which shard was broken.  Moving
multi-GB Hugging Face checkpoints in and out must keep host memory near ONE
tensor, and a truncated/corrupt download must fail at open time with the file
path and tensor name in the message.

On-disk format (same as the reference implementation)::

    [u64 little-endian N][N bytes UTF-8 JSON header][data region]
    header = {name: {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]},
              "__metadata__": {str: str}}                  # metadata optional
    offsets are relative to the first byte of the data region (8 + N).

Public API
----------
``CheckpointError(ValueError)``: malformed file/index; ``.path``, ``.tensor``.
``SafetensorsFile(path)``: one file.  ``keys()``, ``shape(name)``,
    ``dtype(name)`` (numpy dtype), ``nbytes(name)``, ``metadata``,
    ``get(name)`` -> read-only zero-copy view on an ``np.memmap``,
    ``get_slice(name, index)``, ``close()``; a context manager.
``SafetensorsCheckpoint(path, filename=None, *, validate=True, strict=False)``:
    ``model.safetensors``, a sharded ``*.safetensors.index.json`` checkpoint,
    a lone ``*.safetensors`` in a directory, or a file path; local or
    ``gs://`` (staged to the verified local cache first, see ``staging.py``).
    Same accessors, plus ``__contains__``, ``file_of(name)``, ``files``,
    ``unindexed``, ``location`` (where the checkpoint was named to be).
``TensorSpec(name, shape, dtype, produce)``
``write_safetensors_checkpoint(out_dir, tensors, *, max_shard_bytes=5*2**30,
    metadata=None, index_name="model.safetensors.index.json",
    single_file_name="model.safetensors", extra_files=None, overwrite=False,
    fsync=True) -> dict`` (the index: ``{"metadata": {"total_size"}, "weight_map"}``);
    ``out_dir`` local or ``gs://``.
"""

from __future__ import annotations

import json
import math
import mmap
import operator
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import ml_dtypes
import numpy as np

from apriel_jax import storage
from apriel_jax.parallel import distributed

__all__ = ["CheckpointError", "SafetensorsFile", "SafetensorsCheckpoint", "TensorSpec",
           "write_safetensors_checkpoint"]

# Byte order is spelled out ("<"): the format is little-endian on every host.
_DTYPES: dict[str, np.dtype] = {k: np.dtype(v) for k, v in {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": np.bool_,
}.items()}

# Same cap as the reference: files we accept, it accepts, and a garbage length
# prefix cannot make us read gigabytes as "header".
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """Malformed checkpoint.  The message starts with the file path (and tensor)."""

    def __init__(self, message: str, *, path: Any = None, tensor: str | None = None):
        parts = [str(path)] if path is not None else []
        if tensor is not None:
            parts.append(f"tensor {tensor!r}")
        super().__init__(": ".join(parts + [message]))
        self.path, self.tensor = path, tensor


def _dtype_name(dt: np.dtype) -> str | None:
    return next((name for name, cand in _DTYPES.items() if dt == cand), None)


class _Entry(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _reject_duplicate_keys(pairs):
    # json.loads silently keeps the last duplicate; two entries under one name
    # means a corrupt header, not something to paper over.
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path, name, info, data_start: int, file_size: int) -> _Entry:
    def fail(msg):
        return CheckpointError(msg, path=path, tensor=name)

    if not isinstance(info, dict):
        raise fail(f"header entry must be an object, got {type(info).__name__}")
    dt_name = info.get("dtype")
    if dt_name not in _DTYPES:
        raise fail(f"unknown dtype {dt_name!r} (supported: {', '.join(_DTYPES)})")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise fail(f"shape must be a list of non-negative ints, got {shape!r}")
    offs = info.get("data_offsets")
    if (not isinstance(offs, list) or len(offs) != 2 or not all(map(_is_int, offs))
            or not 0 <= offs[0] <= offs[1]):
        raise fail(f"data_offsets must be [begin, end], 0 <= begin <= end, got {offs!r}")
    dtype = _DTYPES[dt_name]
    needed = math.prod(shape) * dtype.itemsize
    if offs[1] - offs[0] != needed:
        raise fail(f"data_offsets {offs} span {offs[1] - offs[0]} bytes but shape "
                   f"{shape} of {dt_name} needs {needed}")
    start, end = data_start + offs[0], data_start + offs[1]
    if end > file_size:
        raise fail(f"data ends at byte {end} but the file has {file_size} bytes (truncated?)")
    return _Entry(dtype, tuple(shape), start, end)


def _read_header(path: Path):
    """Validate everything checkable without tensor data -> (entries, metadata, size).

    So a truncated/corrupt download fails at open, not halfway through an import.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"file has {size} bytes, too small for safetensors", path=path)
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(f"header length {n} exceeds the file size {size} "
                                  "(truncated or not a safetensors file)", path=path)
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"header length {n} exceeds {_MAX_HEADER_BYTES}", path=path)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except ValueError as e:  # covers JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"invalid JSON header: {e}", path=path) from None
    if not isinstance(header, dict):
        raise CheckpointError("JSON header must be an object", path=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError("__metadata__ must map str to str", path=path)
    entries = {k: _parse_entry(path, k, v, 8 + n, size) for k, v in header.items()}
    # Overlaps mean two tensors silently alias the same bytes: reject.  Gaps
    # and trailing bytes are harmless to read and tolerated.  Empty tensors
    # occupy no bytes and are skipped.
    spans = sorted((e.start, e.end, k) for k, e in entries.items() if e.end > e.start)
    for (_, end0, name0), (start1, _, name1) in zip(spans, spans[1:]):
        if start1 < end0:
            raise CheckpointError(f"data overlaps tensor {name0!r}", path=path, tensor=name1)
    return entries, metadata, size


class _Reader:
    """Accessors shared by SafetensorsFile and SafetensorsCheckpoint.

    Subclasses define keys(), close() and _lookup(name) -> (file, entry).
    """

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return self._lookup(name)[1].shape

    def dtype(self, name: str) -> np.dtype:
        return self._lookup(name)[1].dtype

    def nbytes(self, name: str) -> int:
        e = self._lookup(name)[1]
        return e.end - e.start

    def get(self, name: str) -> np.ndarray:
        """Read-only zero-copy memmap view (pages read when touched; valid after close())."""
        f, e = self._lookup(name)
        return f._view(e)

    def get_slice(self, name: str, index) -> np.ndarray:
        """``get(name)[index]``: with basic indexing only touched pages are read."""
        return self.get(name)[index]

    def release(self, name: str) -> None:
        """Unmap this tensor's pages from the process (the OS page cache keeps them).

        Touched pages of a mapping count as resident memory until unmapped; releasing each tensor once
        it has been consumed keeps a streaming import near one tensor of RSS. Views stay valid: a later
        read faults the pages back in.
        """
        f, e = self._lookup(name)
        f._release(e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsFile(_Reader):
    """One safetensors file: header validated at open, data memory-mapped lazily."""

    def __init__(self, path):
        self.path = Path(path)
        self._entries, self._metadata, self._size = _read_header(self.path)
        # Data order, so a loop over keys() reads the file sequentially.
        self._keys = sorted(self._entries, key=lambda k: (self._entries[k].start, k))
        self._mm: np.memmap | None = None
        self._closed = False

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def _lookup(self, name: str):
        try:
            return self, self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _view(self, e: _Entry) -> np.ndarray:
        if self._closed:
            raise ValueError(f"{self.path}: file is closed")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            if self._mm.size != self._size:  # replaced on disk since the header was read
                raise CheckpointError(f"file size changed from {self._size} to "
                                      f"{self._mm.size} since open", path=self.path)
        # np.asarray drops the memmap subclass (odd ufunc results) without a
        # copy; view/reshape only change metadata.  mode="r" => read-only.
        return np.asarray(self._mm[e.start:e.end]).view(e.dtype).reshape(e.shape)

    def _release(self, e: _Entry) -> None:
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = e.start - e.start % mmap.PAGESIZE
        if e.end > start:
            self._mm._mmap.madvise(mmap.MADV_DONTNEED, start, e.end - start)

    def close(self) -> None:
        # Only drop our reference: arrays handed out keep the mmap alive, and
        # unmapping under them would turn later reads into segfaults.
        self._mm = None
        self._closed = True


def discover(names: Iterable[str], directory) -> str:
    """The checkpoint file (index or single file) among the file ``names`` of ``directory``."""
    names = set(names)
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if name in names:
            return name
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    files = sorted(n for n in names if n.endswith(".safetensors"))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes and len(files) == 1:  # e.g. a lone consolidated.safetensors
        return files[0]
    raise CheckpointError(f"cannot pick a checkpoint: index files {indexes}, safetensors "
                          f"files {files}; pass filename= explicitly", path=directory)


def parse_index(text: str, index_path) -> tuple[dict[str, str], dict]:
    """(weight map, metadata) of a ``*.safetensors.index.json``; shard names must stay in its directory."""
    try:
        index = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"invalid index JSON: {e}", path=index_path) from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise CheckpointError("index needs a 'weight_map' of str -> str", path=index_path)
    for name, fname in wmap.items():
        # Shards live next to the index: never let an index aim reads elsewhere.
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise CheckpointError(f"shard path {fname!r} escapes the directory",
                                  path=index_path, tensor=name)
    meta = index.get("metadata")
    return dict(wmap), dict(meta) if isinstance(meta, dict) else {}


class SafetensorsCheckpoint(_Reader):
    """A single-file or sharded checkpoint, read through per-file memmaps.

    validate=True reads every shard header now (cheap: no tensor data) so bad
    shards fail immediately; otherwise each shard is checked on first access.
    strict=True makes "tensor in a shard but not in the index" an error
    instead of a warning (recorded in ``unindexed``).
    """

    def __init__(self, path, filename: str | None = None, *, validate: bool = True,
                 strict: bool = False):
        self.location = os.fspath(path)
        if storage.is_remote(path):
            # Memory maps need local files (staging.py says why staging rather than range reads).
            from apriel_jax.checkpoint.staging import stage_checkpoint

            path, filename = stage_checkpoint(path, filename)
        path = Path(path)
        if path.is_file():
            directory, filename = path.parent, path.name
        elif path.is_dir():
            directory = path
            filename = filename or discover((p.name for p in path.iterdir() if p.is_file()), path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
        self.directory, self._strict = directory, strict
        self._files: dict[str, SafetensorsFile] = {}
        self._unindexed: dict[str, list[str]] = {}
        self.index_path: Path | None = None
        if filename.endswith(".json"):
            self.index_path = directory / filename
            self._load_index(self.index_path)
            for fname in self.files if validate else ():
                self._shard(fname)
        else:
            f = self._files[filename] = SafetensorsFile(directory / filename)
            self._weight_map = {k: filename for k in f.keys()}
            self._metadata: dict = f.metadata

    def _load_index(self, index_path: Path) -> None:
        try:
            text = index_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"invalid index JSON: {e}", path=index_path) from None
        self._weight_map, self._metadata = parse_index(text, index_path)

    def _shard(self, fname: str) -> SafetensorsFile:
        if fname in self._files:
            return self._files[fname]
        index_name = self.index_path.name
        expected = [n for n, fn in self._weight_map.items() if fn == fname]
        if not (self.directory / fname).is_file():
            raise CheckpointError(f"shard named by {index_name} does not exist",
                                  path=self.directory / fname, tensor=expected[0])
        f = SafetensorsFile(self.directory / fname)
        missing = [n for n in expected if n not in f]
        if missing:
            raise CheckpointError(f"{index_name} maps {len(missing)} tensor(s) to this file "
                                  f"but it lacks them: {missing[:5]}", path=f.path,
                                  tensor=missing[0])
        extra = [n for n in f.keys() if self._weight_map.get(n) != fname]
        if extra:
            msg = f"{len(extra)} tensor(s) in the file not mapped to it by {index_name}"
            if self._strict:
                raise CheckpointError(msg, path=f.path, tensor=extra[0])
            warnings.warn(f"{f.path}: {msg}: {extra[:5]}", stacklevel=3)
            self._unindexed[fname] = extra
        self._files[fname] = f
        return f

    def _lookup(self, name: str):
        try:
            fname = self._weight_map[name]
        except KeyError:
            raise KeyError(f"{self.directory}: no tensor named {name!r}") from None
        return self._shard(fname)._lookup(name)

    @property
    def metadata(self) -> dict:
        return dict(self._metadata)

    @property
    def files(self) -> list[str]:
        return sorted(set(self._weight_map.values()))

    @property
    def unindexed(self) -> dict[str, list[str]]:
        """Tensors found in opened shards that the index does not map there."""
        return {k: list(v) for k, v in self._unindexed.items()}

    def file_of(self, name: str) -> Path:
        return self._lookup(name)[0].path

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def __contains__(self, name) -> bool:
        return name in self._weight_map

    def close(self) -> None:
        for f in self._files.values():
            f.close()


# ------------------------------------------------------------------ writer

class TensorSpec(NamedTuple):
    """A tensor to write; ``produce()`` is called once, just before its bytes go out."""

    name: str
    shape: tuple[int, ...]
    dtype: Any  # anything np.dtype() accepts, e.g. np.float32 or ml_dtypes.bfloat16
    produce: Callable[[], Any]


class _Planned(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    st_dtype: str
    nbytes: int
    produce: Callable[[], Any]


def _plan_specs(tensors: Iterable, where: Path) -> list[_Planned]:
    out: list[_Planned] = []
    seen: set[str] = set()
    for item in tensors:
        if not isinstance(item, tuple) or len(item) != 4:
            raise TypeError(f"expected TensorSpec(name, shape, dtype, produce), got {item!r:.80}")
        name, shape, dtype, produce = item
        if not isinstance(name, str) or not name or name == "__metadata__" or name in seen:
            raise CheckpointError("invalid or duplicate tensor name", path=where, tensor=name)
        seen.add(name)
        shape = tuple(operator.index(d) for d in shape)
        dt = np.dtype(dtype)
        dt = dt.newbyteorder("<") if dt.byteorder == ">" else dt
        st = _dtype_name(dt)
        if st is None or any(d < 0 for d in shape) or not callable(produce):
            raise CheckpointError(f"unsupported spec: shape={shape} dtype={dt} "
                                  f"callable(produce)={callable(produce)}", path=where, tensor=name)
        out.append(_Planned(name, shape, dt, st, math.prod(shape) * dt.itemsize, produce))
    return out


def _split_shards(specs: list[_Planned], max_bytes: int) -> list[list[_Planned]]:
    # Greedy in the given order so produce() runs in the caller's order; a
    # tensor larger than the limit gets a shard of its own (as HF does).
    shards: list[list[_Planned]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return shards


def _write_tensor(f, spec: _Planned, path: Path) -> None:
    # A separate function so the produced array dies as soon as its bytes are
    # written: peak host memory stays about one tensor.
    arr = np.asarray(spec.produce())
    if arr.shape != spec.shape:
        raise CheckpointError(f"produce() returned shape {arr.shape}, spec says {spec.shape}",
                              path=path, tensor=spec.name)
    if arr.dtype != spec.dtype:
        if arr.dtype.byteorder == ">" and arr.dtype.newbyteorder("<") == spec.dtype:
            arr = arr.astype(spec.dtype)
        else:
            raise CheckpointError(f"produce() returned dtype {arr.dtype}, spec says "
                                  f"{spec.dtype}", path=path, tensor=spec.name)
    # reshape(-1) first: a 0-d array cannot be re-viewed with another itemsize.
    f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)


def _write_shard(path, shard: list[_Planned], metadata: dict, fsync: bool) -> None:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for s in shard:  # contiguous, no gaps: the reference reader rejects gaps
        header[s.name] = {"dtype": s.st_dtype, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad with spaces to 8 bytes, like the reference

    def write(f):
        f.write(len(blob).to_bytes(8, "little") + blob)
        for s in shard:
            _write_tensor(f, s, path)

    if storage.is_remote(path):
        # Streamed: the object store receives it in upload chunks while tensors are produced, and
        # the object exists only once the upload completes (nothing to fsync).
        with storage.storage_errors(path, "write"), path.open("wb") as f:
            write(f)
        return
    with open(path, "wb") as f:
        write(f)
        f.flush()
        if fsync:  # before the rename, so a crash cannot leave empty shards behind
            os.fsync(f.fileno())


def _marker(extra: Mapping, names: list[str], index_name: str) -> str:
    """The file readers trust the output by, written last: config.json (HF), params.json (Mistral) or
    adapter_config.json (PEFT) when given, else the index of a sharded checkpoint, else its single file."""
    for name in ("config.json", "params.json", "adapter_config.json"):
        if name in extra:
            return name
    return index_name if len(names) > 1 else names[0]


def write_safetensors_checkpoint(
    out_dir,
    tensors: Iterable[TensorSpec],
    *,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
    index_name: str = "model.safetensors.index.json",
    single_file_name: str = "model.safetensors",
    extra_files: Mapping[str, bytes | str] | None = None,
    overwrite: bool = False,
    fsync: bool = True,
) -> dict:
    """Write a (possibly sharded) checkpoint with one tensor in memory at a time.

    Shards are planned from the specs first because each file's header (with
    every offset) precedes its data.  One shard -> ``single_file_name`` and no
    index (HF convention); several -> ``<stem>-0000i-of-0000N.safetensors`` plus
    ``index_name``.  ``out_dir`` (local or ``gs://``) is published through
    ``storage.new_directory``: locally all files (and ``extra_files``, e.g.
    config.json) are written under a temporary name that is renamed into place
    on success, and removed on any error, so a half-written ``out_dir`` never
    exists; on GCS the files are written in place with the marker (see
    ``_marker``) last, and readers refuse a directory without it.
    ``metadata`` goes into every shard header with ``format`` defaulting to
    ``"pt"`` (transformers refuses files without it).  ``fsync`` applies to
    local shards.  Returns the index dict.
    """
    out = storage.location(out_dir)
    specs = _plan_specs(tensors, out)
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("metadata must map str to str")
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")

    shards = _split_shards(specs, max_shard_bytes)
    stem = single_file_name.removesuffix(".safetensors")
    names = ([single_file_name] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {s.name: fname for fname, shard in zip(names, shards) for s in shard}
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
             "weight_map": dict(sorted(weight_map.items()))}
    extra = dict(extra_files or {})
    reserved = set(names) | ({index_name} if len(shards) > 1 else set())
    for name in extra:
        if name in reserved or name in (".", "..") or Path(name).name != name:
            raise ValueError(f"invalid or clashing extra file name {name!r}")
    small = {name: content.encode("utf-8") if isinstance(content, str) else bytes(content)
             for name, content in extra.items()}
    if len(shards) > 1:
        small[index_name] = (json.dumps(index, indent=2) + "\n").encode("utf-8")
    marker = _marker(extra, names, index_name)

    # new_directory refuses a non-empty out_dir (without overwrite) before anything is written.
    hosts = distributed.hosts()
    with storage.new_directory(out, marker=marker, overwrite=overwrite, hosts=hosts) as tmp:
        writes = [(fname, lambda fname=fname, shard=shard: _write_shard(tmp / fname, shard, meta, fsync),
                   shard) for fname, shard in zip(names, shards)]
        writes += [(name, lambda name=name, data=data: storage.write_bytes(tmp / name, data), [])
                   for name, data in small.items()]
        for _, write, shard in sorted(writes, key=lambda w: w[0] == marker):  # stable: only the marker moves last
            if hosts.primary:
                write()
            else:  # produce() may be a collective (a tensor sharded over processes): take part, write nothing
                for spec in shard:
                    spec.produce()
    return index
