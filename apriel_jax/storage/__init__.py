"""Where apriel-jax keeps things: local paths and ``gs://`` URLs, named and handled one way.

Every reader and writer of the project (run directories, checkpoints, stage results and markers, metrics,
TensorBoard events, plots, exports, base checkpoints, tokenizer files, data shards) takes its locations
through :func:`location`, which returns an ``etils.epath.Path``:

* a local path is made absolute and behaves like ``pathlib.Path`` (nothing changes for local runs);
* a ``gs://bucket/key`` URL keeps its scheme. epath reaches it through fsspec/gcsfs for plain file
  operations, and the libraries that speak GCS themselves get the URL unchanged: orbax and tensorstore
  (checkpoints), array_record (reading shards).

Why epath rather than fsspec directly: orbax already takes ``epath.Path`` (so a checkpoint directory is
passed through untouched), and epath keeps pathlib's API, so the local code path stays what it was.

Object stores have no directories and no atomic rename; :mod:`.publish` holds the rules that replace
write-then-rename there (a finished marker written last). :mod:`.spool` appends to logs that live in
a bucket; :mod:`.gcs` talks to GCS (emulator wiring, checksums, staging to a local cache);
:mod:`.errors` turns cloud failures into one-line errors that name the location.
"""

from apriel_jax.storage.errors import StorageError, preflight, storage_errors
from apriel_jax.storage.paths import (
    Location,
    expand_patterns,
    has_glob,
    is_remote,
    local_copy,
    location,
    move_tree,
    read_bytes,
    read_text,
    remove_tree,
)
from apriel_jax.storage.publish import new_directory, write_bytes, write_json, write_text
from apriel_jax.storage.spool import AppendLog, SpooledDirectory

__all__ = [
    "AppendLog", "Location", "SpooledDirectory", "StorageError", "expand_patterns", "has_glob", "is_remote",
    "local_copy", "location", "move_tree", "new_directory", "preflight", "read_bytes", "read_text", "remove_tree",
    "storage_errors", "write_bytes", "write_json", "write_text",
]
