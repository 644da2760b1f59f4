"""Data files read by record sources, local or ``gs://``: random reads through handles opened lazily in
each process, streaming reads for one pass over a file, and where paths named inside data files point.

Record sources are pickled into grain's worker processes, and an open file (or a gcsfs file with its
HTTP session) does not survive that: :class:`LazyFiles` keeps only the paths in its pickled state and
opens a file the first time a process reads from it.

On GCS a random read is one range request for exactly the bytes asked for. gcsfs files read ahead
5 MB by default, which suits one pass over a file, but a shuffled source reads a few kilobytes at a
random place each time and would download the rest for nothing.
"""

from __future__ import annotations

import os
import posixpath
import threading
from typing import IO

from apriel_jax import storage
from apriel_jax.storage import gcs

__all__ = ["LazyFiles", "join_relative", "open_for_random_reads", "open_for_streaming", "parent_dir"]


def parent_dir(path) -> str:
    """The folder of a file: ``gs://b/d`` for ``gs://b/d/f.jsonl``; an absolute path locally."""
    text = os.fspath(path)
    if storage.is_remote(text):
        return posixpath.dirname(text)
    return os.path.dirname(os.path.abspath(text))


def join_relative(base_dir, ref) -> str:
    """``ref`` (a path named inside a data file) as a location: absolute paths and ``gs://`` URLs as
    they are, relative ones under ``base_dir`` (the data file's folder, local or ``gs://``)."""
    ref = os.fspath(ref)
    if storage.is_remote(ref) or os.path.isabs(ref) or not base_dir:
        return ref
    base_dir = os.fspath(base_dir)
    if storage.is_remote(base_dir):
        return posixpath.join(base_dir, ref)
    return os.path.join(base_dir, ref)


def open_for_random_reads(path) -> IO[bytes]:
    """A seekable binary file whose reads fetch exactly what is asked for (no read-ahead on GCS)."""
    loc = storage.location(path)
    if storage.is_remote(loc):
        with storage.storage_errors(loc, "read"):
            return gcs.filesystem().open(os.fspath(loc), "rb", cache_type="none")
    return open(loc, "rb")


class _StreamingFile:
    """A binary file read front to back; a failed read is reported as the clear error naming it."""

    def __init__(self, path):
        self.location = storage.location(path)
        with storage.storage_errors(self.location, "read"):
            self._fh = self.location.open("rb")

    def read(self, size: int = -1) -> bytes:
        with storage.storage_errors(self.location, "read"):
            return self._fh.read(size)

    def tell(self) -> int:
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_for_streaming(path) -> _StreamingFile:
    """A binary file for one sequential pass (read-ahead on GCS); use it as a context manager."""
    return _StreamingFile(path)


class LazyFiles:
    """Random reads of a list of files; each process opens a file on its first read of it.

    Reads of one file from several threads are serialised (a read is a seek then a read on a shared
    handle). Pickling keeps the paths only.
    """

    def __init__(self, paths):
        self.paths = [os.fspath(p) for p in paths]
        self._handles: dict[int, IO[bytes]] = {}
        self._lock = threading.Lock()

    def handle(self, index: int) -> IO[bytes]:
        """The open file ``paths[index]`` of this process (for libraries that read it themselves)."""
        fh = self._handles.get(index)
        if fh is None:
            with self._lock:
                fh = self._handles.get(index)
                if fh is None:
                    fh = self._handles[index] = open_for_random_reads(self.paths[index])
        return fh

    def read(self, index: int, start: int, size: int) -> bytes:
        """``size`` bytes of file ``index`` from offset ``start`` (fewer at the end of the file)."""
        fh = self.handle(index)
        with self._lock, storage.storage_errors(self.paths[index], "read"):
            fh.seek(start)
            return fh.read(size)

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])
