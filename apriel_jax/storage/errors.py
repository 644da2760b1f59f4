"""Cloud storage failures as one-line errors that name the location and what to do about it.

gcsfs, google-auth, tensorstore and array_record each report a missing bucket, a refused permission or
absent credentials differently (an API path in a FileNotFoundError, "Forbidden" in an OSError, an HTTP
401 after retries, a status code inside a tensorstore ValueError). :func:`storage_errors` turns each
into a :class:`StorageError` or a FileNotFoundError whose message starts with the ``gs://`` location;
:func:`preflight` finds the same problems before a run spends time compiling.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import Iterable

CREDENTIALS_HINT = (
    "no usable Google Cloud credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key "
    "file, or run `gcloud auth application-default login` (on a TPU VM or GKE node the node's service "
    "account is used; it needs the storage scope)")


class StorageError(OSError):
    """A location cannot be read or written (credentials, bucket, permission, a failed transfer)."""


def _status_of(err: BaseException) -> int | None:
    code = getattr(err, "code", None)
    if isinstance(code, int):
        return code
    text = str(err)
    if text.startswith("Forbidden") or "PERMISSION_DENIED" in text or "HTTP response code: 403" in text:
        return 403
    if "UNAUTHENTICATED" in text or "HTTP response code: 401" in text or "Invalid Credentials" in text:
        return 401
    if re.search(r"\bNOT_FOUND\b|HTTP response code: 404", text):
        return 404
    if re.search(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED)\b|HTTP response code: (5\d\d|429|408)", text):
        return 503
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


# A status word as absl/tensorstore put it at the start of a message ("RESOURCE_EXHAUSTED: Error writing ...").
_STATUS = re.compile(r"\b(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
                     r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|UNIMPLEMENTED|"
                     r"INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): ")


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def io_failure(err: BaseException) -> str | None:
    """One line saying why a read or write failed, or None when ``err`` is no I/O failure (a bug, a shape
    mismatch). Libraries wrap the cause: orbax re-raises tensorstore's status inside its own exceptions
    and appends a dump of the whole TensorStore spec; the cause is the innermost status or OSError, and
    the dump and tensorstore's ``[source locations=...]`` are left out."""
    for link in _chain(err):
        text = str(link)
        match = _STATUS.search(text)
        if match:
            line = text[match.start():].splitlines()[0]
            # tensorstore appends its whole spec and the C++ source lines: neither says why it failed.
            line = re.sub(r"\s*\[tensorstore_spec='.*?'\]", "", line)
            line = re.sub(r"\s*\[source locations=.*$", "", line)
            # Long paths push the OS error (at the end) far out: keep both ends of a long line.
            return line if len(line) <= 500 else f"{line[:240]} ... {line[-240:]}"
        if isinstance(link, OSError) and not isinstance(link, StorageError):
            return f"{type(link).__name__}: {_first_line(link)}"
        if isinstance(link, StorageError):
            return _first_line(link)
    return None


def _is_credentials_error(err: BaseException) -> bool:
    try:
        from google.auth import exceptions as auth_exceptions
    except ImportError:  # pragma: no cover - google-auth comes with gcsfs
        return False
    return isinstance(err, (auth_exceptions.DefaultCredentialsError, auth_exceptions.RefreshError))


def describe(err: BaseException, where, action: str = "access") -> BaseException:
    """The clear error for ``err`` raised while trying to ``action`` the location ``where``, or ``err``
    itself when it is not a cloud failure (local paths keep their usual errors)."""
    from apriel_jax.storage.paths import is_remote

    text = os.fspath(where)
    if isinstance(err, StorageError) or not is_remote(text):
        return err
    from apriel_jax.storage import gcs

    if _is_credentials_error(err):
        return StorageError(f"{text}: cannot {action}: {CREDENTIALS_HINT}")
    status = _status_of(err)
    if status == 401:
        return StorageError(f"{text}: cannot {action}: {CREDENTIALS_HINT}")
    if status == 403:
        return StorageError(f"{text}: cannot {action}: permission denied (the account needs "
                            f"{'roles/storage.objectAdmin' if action == 'write' else 'roles/storage.objectViewer'}"
                            " on the bucket)")
    if status is not None and (status >= 500 or status in (408, 429)):
        # The clients retry these with backoff already: reaching here means the service kept failing.
        return StorageError(f"{text}: cannot {action}: the storage service kept failing after retries "
                            f"(HTTP {status}): {_first_line(err)}")
    if isinstance(err, FileNotFoundError) or status == 404:
        bucket, _ = gcs.split_url(text)
        try:
            exists = gcs.bucket_exists(bucket)
        except Exception:  # the bucket check failing too says nothing more: keep the first error
            exists = True
        if not exists:
            return StorageError(f"{text}: bucket gs://{bucket} does not exist (or these credentials cannot see it)")
        return FileNotFoundError(f"{text}: no such object")
    return err


@contextlib.contextmanager
def storage_errors(where, action: str = "access"):
    """Re-raise cloud failures inside the block as clear errors naming ``where`` (see :func:`describe`)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - translated or re-raised unchanged
        clear = describe(err, where, action)
        if clear is err:
            raise
        raise clear from err


def check_credentials() -> None:
    """StorageError when no Google credentials can be found (nothing to check against an emulator)."""
    from apriel_jax.storage import gcs

    if gcs.using_emulator():
        return
    try:
        import google.auth

        google.auth.default()
    except Exception as err:  # noqa: BLE001
        if _is_credentials_error(err):
            raise StorageError(CREDENTIALS_HINT) from err
        raise


def preflight(read: Iterable = (), write: Iterable = ()) -> None:
    """Check remote locations before any work: credentials, buckets, and that ``write`` locations accept
    an object (a probe object is written and deleted). Local locations are not checked here."""
    from apriel_jax.storage import gcs
    from apriel_jax.storage.paths import is_remote, location

    read = [os.fspath(p) for p in read if p and is_remote(p)]
    write = [os.fspath(p) for p in write if p and is_remote(p)]
    if not read and not write:
        return
    check_credentials()
    for url in dict.fromkeys(read + write):
        bucket, _ = gcs.split_url(url)
        with storage_errors(url, "write" if url in write else "read"):
            if not gcs.bucket_exists(bucket):
                raise StorageError(f"{url}: bucket gs://{bucket} does not exist (or these credentials cannot see it)")
    for url in dict.fromkeys(write):
        probe = location(url) / f".apriel-write-probe-{uuid.uuid4().hex}"
        with storage_errors(url, "write"):
            probe.write_bytes(b"")
            probe.unlink()


DEBUG_ENV = "APRIEL_DEBUG"  # set by `apriel-jax --debug`: keep every library message and traceback


class _DropBackgroundIoFailures:
    """A logging filter: drops records that carry an I/O failure as their exception (see :func:`io_failure`)."""

    def filter(self, record) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return err is None or io_failure(err) is None


def _unraisable_hook(previous):
    def hook(unraisable):
        # tensorstore completes the futures of a failed save from its own threads; when orbax has closed
        # the asyncio loop they belong to by then, each completion reports "Event loop is closed".
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.apriel_quiet = True
    return hook


def quiet_background_failures() -> None:
    """Keep a failed checkpoint save to the one line the training loop prints about it.

    A save that fails (a full disk, a bucket that went away) fails in orbax's background threads first:
    each thread logs the error with its traceback (absl and asyncio loggers), and tensorstore prints an
    "Event loop is closed" traceback per pending write, hundreds of lines in all before the failure
    reaches the main thread, which reports it once. Those records are dropped for the whole process
    (idempotent); other errors are untouched, and nothing is dropped under ``APRIEL_DEBUG``.
    """
    import logging
    import sys

    if os.environ.get(DEBUG_ENV):
        return
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBackgroundIoFailures) for f in logger.filters):
            logger.addFilter(_DropBackgroundIoFailures())
    if not getattr(sys.unraisablehook, "apriel_quiet", False):
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)

