"""Naming locations: :func:`location` for one, :func:`expand_patterns` for lists and globs of files."""

from __future__ import annotations

import os
from typing import Iterable

from etils import epath

from apriel_jax.storage import gcs
from apriel_jax.storage.errors import StorageError, storage_errors

Location = epath.Path

_GLOB_CHARS = ("*", "?", "[")


def is_remote(path) -> bool:
    """Whether ``path`` names an object store location (``gs://``) rather than a local file."""
    return os.fspath(path).startswith("gs://")


def location(path) -> epath.Path:
    """The one way to name a location: a local path (made absolute, ``~`` expanded) or a ``gs://`` URL.

    Other URL schemes are refused: only local paths and GCS are tested end to end.
    """
    if isinstance(path, epath.Path) and is_remote(path):
        return path
    text = os.fspath(path)
    if not text:
        raise ValueError("empty path")
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme != "gs":
            raise StorageError(f"{text}: unsupported scheme {scheme}:// (use a local path or gs://bucket/...)")
        bucket, _ = gcs.split_url(text)
        if not bucket:
            raise StorageError(f"{text}: no bucket name")
        gcs.configure_environment()
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def has_glob(path) -> bool:
    return any(c in os.fspath(path) for c in _GLOB_CHARS)


def _glob(pattern: str) -> list[str]:
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if has_glob(part))
    base = "/".join(parts[:first]) or "/"
    rest = "/".join(parts[first:])
    root = location(base)
    with storage_errors(base, "list"):
        return sorted(os.fspath(p) for p in root.glob(rest) if p.is_file())


def expand_patterns(patterns, *, what: str = "input files") -> list[str]:
    """Files named by ``patterns`` (a path, a glob, or a list of them; local or ``gs://``), in order.

    Each glob expands to its matches sorted by name; a glob that matches nothing, or a plain path that
    does not exist, is a FileNotFoundError naming it. Callers that must read the same files again later
    (a resumed run) record the returned list instead of expanding the patterns again.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[str] = []
    for pattern in patterns:
        text = os.fspath(pattern)
        if not is_remote(text):
            text = os.path.abspath(os.path.expanduser(text))
        if has_glob(text):
            matches = _glob(text)
            if not matches:
                raise FileNotFoundError(f"{what}: the pattern {os.fspath(pattern)!r} matches no file")
            out.extend(matches)
            continue
        loc = location(text)
        with storage_errors(text, "read"):
            found = loc.is_file()
        if not found:
            raise FileNotFoundError(f"{what}: {os.fspath(pattern)} does not exist or is not a file")
        out.append(os.fspath(loc))
    if not out:
        raise ValueError(f"{what}: no paths given")
    return out


def read_bytes(path) -> bytes:
    loc = location(path)
    with storage_errors(loc, "read"):
        return loc.read_bytes()


def read_text(path, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def remove_tree(path) -> None:
    """Delete a directory (local) or every object under a prefix (remote); nothing there is fine."""
    loc = location(path)
    with storage_errors(loc, "delete"):
        if is_remote(loc):
            if loc.exists():
                loc.rmtree()
        elif loc.is_dir():
            loc.rmtree()
        elif loc.exists():
            loc.unlink()


def move_tree(src, dst) -> None:
    """Move a directory (or an object prefix) to ``dst``, which must not exist. Locally a rename; on GCS,
    which cannot rename, each object is copied server-side, then deleted."""
    src, dst = location(src), location(dst)
    with storage_errors(dst, "write"):
        if dst.exists():
            raise FileExistsError(f"{dst} already exists")
        if is_remote(src):
            gcs.filesystem().mv(os.fspath(src), os.fspath(dst), recursive=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)


def local_copy(path, cache_dir: str | None = None) -> str:
    """A local file path with the content of ``path``: the path itself when local, else a verified copy
    in the local cache (see :func:`apriel_jax.storage.gcs.stage_file`)."""
    if not is_remote(path):
        return os.fspath(location(path))
    with storage_errors(path, "read"):
        return gcs.stage_file(os.fspath(path), cache_dir)


def local_copies(paths: Iterable, cache_dir: str | None = None) -> list[str]:
    """:func:`local_copy` of several files, remote ones downloaded in parallel."""
    paths = [os.fspath(p) for p in paths]
    remote = [p for p in paths if is_remote(p)]
    if remote:
        with storage_errors(remote[0], "read"):
            staged = dict(zip(remote, gcs.stage_files(remote, cache_dir)))
    else:
        staged = {}
    return [staged.get(p) or local_copy(p) for p in paths]
