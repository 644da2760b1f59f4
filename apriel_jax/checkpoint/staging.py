"""A ``gs://`` safetensors checkpoint as local files, for the memory-mapped reader.

The directory's checkpoint file (index or single file), every shard the index names and the small
sidecars (config, tokenizer, chat template, processor files) are copied into the verified local cache
of :mod:`apriel_jax.storage` (``$APRIEL_CACHE_DIR``, default ``~/.cache/apriel-jax``): each file is
checked against the object's size and CRC32C before it is used, and reused while the object's
generation is unchanged, so a job restarted on the same VM checks metadata instead of downloading.

Why staging rather than range reads: an import converts each tensor whole before taking a device's
slice (the HF and Mistral layouts are transposed and permuted relative to ours), so every host reads
every byte of every tensor it holds a shard of: on a pod, the whole checkpoint. Range reads would
fetch the same bytes in many small requests and again on every restart; a staged copy is fetched in
a few parallel streams once, then read at local-disk speed. The cost is local disk the size of the
checkpoint on each host.
"""

from __future__ import annotations

import os

from apriel_jax import storage
from apriel_jax.checkpoint.safetensors_io import CheckpointError, discover, parse_index
from apriel_jax.storage.paths import local_copies

# Small files that travel beside the weights and that readers of a local directory may want.
SIDECAR_SUFFIXES = (".json", ".jinja", ".model", ".txt")


def stage_checkpoint(path, filename: str | None = None) -> tuple[str, str]:
    """(local directory, checkpoint file name) of a verified local copy of the remote checkpoint
    ``path`` (a directory, or a ``.safetensors`` / index file in one).

    Only the files of the current checkpoint are staged and named; the local directory may also hold
    files an earlier version of the same prefix had, so read it through the returned file name.
    """
    loc = storage.location(path)
    try:
        with storage.storage_errors(loc, "read"):
            if loc.is_file():
                loc, filename = loc.parent, loc.name
            names = {p.name for p in loc.iterdir()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{loc}: no such file or directory") from None
    filename = filename or discover(names, loc)
    if filename not in names:
        raise FileNotFoundError(f"{loc / filename}: no such file")
    if filename.endswith(".json"):
        with open(storage.local_copy(loc / filename), encoding="utf-8") as f:
            weight_map, _ = parse_index(f.read(), loc / filename)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if shard not in names:
                tensor = next(n for n, fn in weight_map.items() if fn == shard)
                raise CheckpointError(f"shard named by {filename} does not exist", path=loc / shard, tensor=tensor)
    else:
        shards = []
    sidecars = sorted(n for n in names if n.endswith(SIDECAR_SUFFIXES))
    local = local_copies([loc / name for name in dict.fromkeys([filename, *shards, *sidecars])])
    return os.path.dirname(local[0]), filename
