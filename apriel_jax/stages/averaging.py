"""Weighted averages of checkpoints, streamed a few tensors at a time.

Used by two finalize steps of the recipe: the equal-weight average of equispaced checkpoints of one run
(6 over the upscaling stage, 3 over CPT-1) and the merge of the finals of several runs (the two SFT runs).

The result is accumulated in fp32 on the mesh, parameter by parameter: each source is read only for the
parameters of the current group (orbax partial restore, each process reading its own shards), so host
memory stays near one group of tensors (``group_bytes``; the largest tensor when it is bigger) whatever
the number of sources. Sources may be run checkpoints (``STEP/state`` with trainable ``params`` and
``frozen`` halves) or apriel-jax model directories (``DIR/params``), local or ``gs://`` (orbax reads and
writes GCS itself); the result is published like any model directory (``orbax_io.save_model``).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from apriel_jax import storage
from apriel_jax.checkpoint.orbax_io import PARAMS_DIR, is_model_dir, save_model
from apriel_jax.model.factory import abstract_model, param_path, state_shardings

DEFAULT_GROUP_BYTES = 256 * 2**20


@contextlib.contextmanager
def _quiet_orbax():
    """Reading a CheckpointManager's item directory directly makes orbax warn that the step-level
    metadata file is not there (it is one level up); the read itself is fine."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


class _Source:
    """Where one checkpoint keeps each model parameter: ``{param path: key tuple in the orbax tree}``."""

    def __init__(self, path):
        path = storage.location(path)
        with storage.storage_errors(path, "read"):
            found = (path / PARAMS_DIR if is_model_dir(path)
                     else path / "state" if (path / "state").is_dir()  # a run checkpoint step directory
                     else None)
        if found is None:
            raise FileNotFoundError(f"{path} is neither an apriel-jax model directory nor a run checkpoint step")
        self.tree_dir = found
        with _quiet_orbax(), ocp.PyTreeCheckpointer() as checkpointer, storage.storage_errors(path, "read"):
            metadata = checkpointer.metadata(self.tree_dir)
        tree = getattr(metadata, "item_metadata", None)
        tree = getattr(tree, "tree", tree) if tree is not None else metadata
        self.keys: dict[str, tuple] = {}
        self.shapes: dict[str, tuple] = {}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path)
            if self.tree_dir.name == "state":
                if keys[0] not in ("params", "frozen"):
                    continue  # optimizer state and step are not part of the model
                name_keys = keys[1:]
            else:
                name_keys = keys
            name = "/".join(str(k) for k in name_keys if k != "value")
            self.keys[name] = keys
            self.shapes[name] = tuple(getattr(leaf, "shape", ()))
        self.path = path

    def read(self, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        """Restore just ``targets`` (param path -> abstract array with its sharding)."""
        item: dict = {}
        for name, target in targets.items():
            node = item
            keys = self.keys[name]
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = target
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        with _quiet_orbax(), ocp.PyTreeCheckpointer() as checkpointer, storage.storage_errors(self.path, "read"):
            restored = checkpointer.restore(
                self.tree_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        out = {}
        for name in targets:
            node = restored
            for k in self.keys[name]:
                node = node[k]
            out[name] = node
        return out


def _check_sources(sources: Sequence[_Source], expected: dict[str, tuple]) -> None:
    for src in sources:
        missing = sorted(set(expected) - set(src.keys))
        extra = sorted(set(src.keys) - set(expected))
        wrong = sorted(n for n in expected if n in src.shapes and src.shapes[n] != expected[n])
        if missing or extra or wrong:
            detail = "; ".join(part for part in (
                f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                "mis-shaped " + ", ".join(f"{n} {src.shapes[n]} != {expected[n]}" for n in wrong[:5]) if wrong else "",
            ) if part)
            raise ValueError(f"{src.path} does not hold the parameters of this model: {detail}")


def _groups(names: list[str], nbytes: dict[str, int], budget: int) -> list[list[str]]:
    groups, current, size = [], [], 0
    for name in names:
        if current and size + nbytes[name] > budget:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes[name]
    if current:
        groups.append(current)
    return groups


def weighted_average(paths: Sequence, weights: Sequence[float], model_cfg, out_dir, *, mesh: Mesh | None = None,
                     group_bytes: int = DEFAULT_GROUP_BYTES,
                     extra_files: dict[str, bytes] | None = None) -> storage.Location:
    """Write ``sum_i weights[i] * checkpoint_i`` as an apriel-jax model directory ``out_dir``.

    Weights must be non-negative and sum to 1. Every source must hold exactly this model's parameters with
    the same shapes (a clear error names the first differences otherwise).
    """
    if len(paths) != len(weights) or not paths:
        raise ValueError(f"need one weight per checkpoint, got {len(paths)} checkpoints and {len(weights)} weights")
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"merge/average weights must be non-negative and sum to 1, got {list(weights)} "
                         f"(sum {sum(weights):.6g})")
    abstract_state = nnx.state(abstract_model(model_cfg))
    shardings = state_shardings(model_cfg, mesh)
    flat = {param_path(p): (x, s) for (p, x), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract_state)[0], jax.tree.leaves(shardings))}
    expected = {n: tuple(x.shape) for n, (x, _) in flat.items()}
    sources = [_Source(p) for p in paths]
    _check_sources(sources, expected)

    names = sorted(flat)
    nbytes = {n: int(np.prod(flat[n][0].shape)) * 4 for n in names}
    result: dict[str, jax.Array] = {}
    for group in _groups(names, nbytes, max(group_bytes, max(nbytes.values()))):
        stored = {n: jax.ShapeDtypeStruct(flat[n][0].shape, flat[n][0].dtype, sharding=flat[n][1]) for n in group}
        acc = None
        for src, w in zip(sources, weights):
            arrays = src.read(stored)
            scaled = {n: arrays[n].astype(jnp.float32) * jnp.float32(w) for n in group}
            acc = scaled if acc is None else {n: acc[n] + scaled[n] for n in group}
            del arrays
        for n in group:
            result[n] = acc[n].astype(flat[n][0].dtype)
    leaves = [result[param_path(p)] for p, _ in jax.tree_util.tree_flatten_with_path(abstract_state)[0]]
    state = jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)
    return save_model(state, model_cfg, out_dir, overwrite=True, extra_files=extra_files)
