"""Google Cloud Storage specifics: one emulator switch for every library, object checksums, and a
verified local cache for files that must be read from a local disk.

Three libraries talk to GCS here, each with its own endpoint setting: gcsfs (epath's backend for
plain file operations) reads ``STORAGE_EMULATOR_HOST``, tensorstore (orbax checkpoints)
``TENSORSTORE_GCS_HTTP_URL``, array_record's C++ reader ``CLOUD_STORAGE_EMULATOR_ENDPOINT``. Setting
``STORAGE_EMULATOR_HOST`` (the variable Google's own clients use) points all three at a GCS API server
such as ``gcp-storage-emulator`` or ``fake-gcs-server``: :func:`configure_environment` fills in the
others, unless they are set.

Staging (:func:`stage_file`): safetensors checkpoints are read through memory maps, and tokenizer
libraries want file names, so such files are copied into a local cache once, checked against the
object's size and CRC32C (GCS keeps both for every object), and reused while the object's generation
is unchanged. A download never becomes visible under its final name before it has been verified.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

EMULATOR_HOST = "STORAGE_EMULATOR_HOST"
CACHE_ENV = "APRIEL_CACHE_DIR"
_CHUNK = 16 * 2**20

_configured = False
_lock = threading.Lock()


def configure_environment() -> None:
    """Settings every GCS client of the process must see before its first request (idempotent).

    * gcsfs >= 2025 probes each bucket's type over gRPC first ("zonal"/HNS buckets); we use no feature
      of those buckets, and against an emulator the probe hangs 60 s per call, so it is off by default
      (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``, set when ``apriel_jax`` is imported: gcsfs reads it once,
      at its own import).
    * fsspec caches directory listings per process; another host's or an earlier run's writes would then
      be invisible (a marker written by process 0 would look absent on process 1), so that cache is off.
    """
    global _configured
    if _configured:
        return
    with _lock:
        host = os.environ.get(EMULATOR_HOST)
        if host:
            url = host if "://" in host else f"http://{host}"
            os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
            os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)
            # tensorstore otherwise looks for real credentials; an emulator accepts any token.
            os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        import fsspec.config

        for protocol in ("gs", "gcs"):
            fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
        _configured = True


def using_emulator() -> bool:
    return bool(os.environ.get(EMULATOR_HOST))


def filesystem():
    """The process's gcsfs filesystem (fsspec caches one instance per set of options)."""
    configure_environment()
    import fsspec

    return fsspec.filesystem("gs")


def split_url(url: str) -> tuple[str, str]:
    """``gs://bucket/key`` -> ``("bucket", "key")``."""
    text = os.fspath(url)
    if not text.startswith("gs://"):
        raise ValueError(f"not a gs:// URL: {text!r}")
    bucket, _, key = text[len("gs://"):].partition("/")
    return bucket, key


def bucket_exists(bucket: str) -> bool:
    """Whether ``bucket`` exists, asked by listing at most one object: that needs only the object
    permissions a job has (reading the bucket's own metadata needs storage.buckets.get, which
    roles/storage.objectAdmin lacks)."""
    try:
        filesystem().call("GET", "b/{}/o", bucket, maxResults=1, json_out=True)
    except FileNotFoundError:
        return False
    return True


def object_info(url: str) -> dict:
    """``{"size", "crc32c", "generation"}`` of an object (FileNotFoundError when absent)."""
    info = filesystem().info(os.fspath(url))
    if info.get("type") != "file":
        raise IsADirectoryError(f"{url} is a directory, not an object")
    return {"size": int(info["size"]), "crc32c": info.get("crc32c"), "generation": str(info.get("generation"))}


def crc32c_of_file(path: str) -> str:
    """Base64 of the big-endian CRC32C of a local file, as GCS reports it."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode("ascii")


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "apriel-jax")


def stage_file(url: str, cache_dir: str | None = None) -> str:
    """A verified local copy of the object ``url`` (downloaded once per generation); returns its path.

    The copy is checked against the object's size and CRC32C before it is renamed to its final name, so
    a killed or corrupted download is never used; a cached copy is reused only while its recorded
    generation, size and checksum still match the object's.
    """
    from apriel_jax.storage.errors import StorageError

    bucket, key = split_url(url)
    info = object_info(url)
    dest = os.path.join(cache_dir or cache_root(), "gcs", bucket, *key.split("/"))
    stamp_path = dest + ".verified.json"
    if os.path.isfile(dest) and os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == info and os.path.getsize(dest) == info["size"]:
                return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    partial = f"{dest}.partial-{os.getpid()}-{threading.get_ident()}"
    try:
        filesystem().get_file(os.fspath(url), partial)
        size = os.path.getsize(partial)
        if size != info["size"]:
            raise StorageError(f"{url}: downloaded {size} bytes, the object has {info['size']}")
        if info["crc32c"] is not None:
            got = crc32c_of_file(partial)
            if got != info["crc32c"]:
                raise StorageError(f"{url}: CRC32C of the download is {got}, the object's is {info['crc32c']}")
        os.replace(partial, dest)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    with open(stamp_path + f".{os.getpid()}", "w") as f:
        json.dump(info, f)
    os.replace(stamp_path + f".{os.getpid()}", stamp_path)
    return dest


def stage_files(urls: list[str], cache_dir: str | None = None, threads: int = 8) -> list[str]:
    """:func:`stage_file` for several objects at once (large checkpoints download in parallel)."""
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(threads, len(urls))) as pool:
        return list(pool.map(lambda u: stage_file(u, cache_dir), urls))
