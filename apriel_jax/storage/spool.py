"""Files that grow while a run goes on (metrics logs, TensorBoard events), kept in a bucket.

Objects cannot be appended to: a growing file is written to a local spool and the whole object is
replaced from it now and then (each upload is atomic, so a reader sees some complete earlier state).
Locally nothing is spooled: the file itself is appended to, as before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from apriel_jax.storage.errors import storage_errors
from apriel_jax.storage.paths import is_remote, location


class AppendLog:
    """An append-only text file, local or ``gs://``.

    Locally every :meth:`write` is flushed to the file at once (readers may follow it live). Remotely
    the lines go to a local spool and the object is replaced by :meth:`flush` at most every
    ``upload_every_s`` seconds, and always by ``flush(force=True)`` and :meth:`close`. An existing log
    (a resumed run) is downloaded first, so appending continues it.
    """

    def __init__(self, path, *, upload_every_s: float = 30.0):
        self.location = location(path)
        self.remote = is_remote(self.location)
        self.upload_every_s = upload_every_s
        self._dirty = False
        self._last_upload = time.monotonic()
        if self.remote:
            fd, self._spool = tempfile.mkstemp(prefix="apriel-log-", suffix=".spool")
            os.close(fd)
            with storage_errors(self.location, "read"):
                if self.location.exists():
                    with open(self._spool, "wb") as f:
                        f.write(self.location.read_bytes())
            self._file = open(self._spool, "a", encoding="utf-8")
        else:
            self.location.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.location, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        self._file.write(line.rstrip("\n") + "\n")
        self._file.flush()
        self._dirty = True
        if self.remote:
            self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Upload the spool if it changed (remote), unless the last upload is younger than the interval
        and ``force`` is off."""
        self._file.flush()
        if not self.remote or not self._dirty:
            return
        if not force and time.monotonic() - self._last_upload < self.upload_every_s:
            return
        with open(self._spool, "rb") as f:
            data = f.read()
        with storage_errors(self.location, "write"):
            self.location.write_bytes(data)
        self._dirty, self._last_upload = False, time.monotonic()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self.flush(force=True)
        finally:
            self._file.close()
            if self.remote:
                os.remove(self._spool)


class SpooledDirectory:
    """A directory a library writes with plain file I/O (``local_dir``), mirrored to a location.

    For a local location ``local_dir`` is the directory itself. For ``gs://`` it is a temporary local
    directory, and :meth:`sync` uploads every file whose size or modification time changed since the
    last upload (each upload replaces the whole object).
    """

    def __init__(self, path):
        self.location = location(path)
        self.remote = is_remote(self.location)
        if self.remote:
            self.local_dir = tempfile.mkdtemp(prefix="apriel-spool-")
        else:
            self.location.mkdir(parents=True, exist_ok=True)
            self.local_dir = os.fspath(self.location)
        self._uploaded: dict[str, tuple[int, int]] = {}

    def sync(self) -> None:
        if not self.remote:
            return
        for root, _, files in os.walk(self.local_dir):
            for name in files:
                local = os.path.join(root, name)
                stat = os.stat(local)
                key = os.path.relpath(local, self.local_dir)
                if self._uploaded.get(key) == (stat.st_size, stat.st_mtime_ns):
                    continue
                with open(local, "rb") as f:
                    data = f.read()
                target = self.location / key
                with storage_errors(target, "write"):
                    target.write_bytes(data)
                self._uploaded[key] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        if self.remote and os.path.isdir(self.local_dir):
            try:
                self.sync()
            finally:
                shutil.rmtree(self.local_dir, ignore_errors=True)
