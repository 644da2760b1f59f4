"""Writing results that readers may trust: single files, and whole directories behind a marker.

A single file (a stage's ``DONE.json``, ``summary.json``, a manifest) is written atomically: locally
through a temporary name and ``os.replace``; on GCS one object upload is already all-or-nothing.

A directory of several files (a model directory, an export, prepared data) cannot appear at once on
an object store, which has no rename. So every such directory has a **marker**: one of its files that
is written last (``config.json`` of an HF export, ``apriel_config.json`` of a model directory,
``manifest.json`` of prepared data), and readers trust the directory only when the marker is there.
:func:`new_directory` applies the same rule locally, where the directory is also assembled under a
temporary name and renamed into place, so a local reader never sees it half-written either.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from apriel_jax.storage.errors import storage_errors
from apriel_jax.storage.paths import is_remote, location, remove_tree


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old content or the new, never a part."""
    loc = location(path)
    if is_remote(loc):
        with storage_errors(loc, "write"):
            loc.write_bytes(bytes(data))
        return
    loc.parent.mkdir(parents=True, exist_ok=True)
    tmp = loc.parent / f".{loc.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, **kwargs) -> None:
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("sort_keys", True)
    write_text(path, json.dumps(obj, **kwargs) + "\n")


def _nonempty(loc) -> bool:
    with storage_errors(loc, "list"):
        return loc.is_dir() and any(True for _ in loc.iterdir())


def _check_destination(out, marker: str, overwrite: bool) -> None:
    if not is_remote(out) and out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if _nonempty(out) and not overwrite:
        complete = (out / marker).exists()
        hint = "" if complete else f" (it has no {marker}: probably an interrupted write)"
        raise FileExistsError(f"{out}: exists and is not empty{hint}; allow overwriting to replace it")


def _hosts(hosts):
    if hosts is not None:
        return hosts
    from apriel_jax.parallel.distributed import hosts as current_hosts

    return current_hosts()


@contextlib.contextmanager
def new_directory(out_dir, *, marker: str, overwrite: bool = False, hosts=None):
    """Yield the location to write a new directory's files into; they become visible at ``out_dir``
    together, and ``out_dir`` is trusted only with its ``marker`` file, which the body writes **last**.

    * Local: the body writes into ``.NAME.partial`` beside ``out_dir``, which is renamed into place on
      success (an existing ``out_dir`` is moved aside first and deleted after, so ``out_dir`` is always
      the old or the complete new directory). The partial name is fixed, so every process of a job
      agrees on it and a leftover of a killed run is cleared by the next one.
    * GCS: the body writes into ``out_dir`` itself. An existing ``out_dir`` first loses its marker (from
      then on no reader trusts it), then its other objects. A body that fails removes what it wrote; one
      that is killed leaves objects without a marker, which readers refuse and the next write clears.

    A non-empty ``out_dir`` is an error unless ``overwrite``. On exit the marker must exist.

    Several processes of one job (``hosts``: :class:`apriel_jax.parallel.distributed.Hosts`, by default
    this process's) enter together: the primary alone clears, checks and renames, the body runs on every
    process (each writes its part, e.g. its orbax shards; the primary writes the single files and the
    marker), and every process leaves once the directory is published.
    """
    hosts = _hosts(hosts)
    out = location(out_dir)
    _check_destination(out, marker, overwrite)  # every process: same storage, same verdict
    remote = is_remote(out)
    target = out if remote else out.parent / f".{out.name}.partial"

    def prepare():
        if remote:
            with storage_errors(out, "write"):
                if (out / marker).exists():
                    (out / marker).unlink()
            remove_tree(out)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_tree(target)
            target.mkdir()

    def publish():
        with storage_errors(out, "read"):
            if not (target / marker).exists():
                raise RuntimeError(f"{out}: the writer finished without writing its marker {marker}")
        if not remote:
            _install(target, out, marker, overwrite)

    hosts.on_primary(f"preparing {out}", prepare)
    try:
        try:
            yield target
        except Exception as e:
            hosts.sync(f"writing {out}", e)  # the other processes stop here too, naming this error
            raise
        hosts.sync(f"writing {out}")
        hosts.on_primary(f"publishing {out}", publish)
    except BaseException:
        if hosts.primary:
            with contextlib.suppress(Exception):
                remove_tree(target)
        raise


def _install(partial, out, marker: str, overwrite: bool) -> None:
    """Rename ``partial`` to ``out``; with ``overwrite`` an existing ``out`` is moved aside first."""
    _check_destination(out, marker, overwrite)  # something may have appeared while we were writing
    if not out.exists():
        os.rename(partial, out)
        return
    if not any(out.iterdir()):
        os.rmdir(out)
        os.rename(partial, out)
        return
    old = out.parent / f".{out.name}.old"
    remove_tree(old)
    os.rename(out, old)
    try:
        os.rename(partial, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
