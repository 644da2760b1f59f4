"""Run checkpoints: train state + data-iterator state + run metadata, in one orbax step directory.

Retention keeps the last ``keep_last`` checkpoints *and* every ``keep_every``-th step forever: the
stage runner averages equispaced checkpoints (the paper averages 6 over the upscaling stage and 3 over
CPT-1), so those must survive the rolling window.

Orbax writes each step under a temporary name and renames it on success, and it ignores (and cleans)
temporary directories on start-up: a save interrupted by a crash or SIGKILL never loads as valid.
Restoring takes an abstract target (shapes, dtypes and shardings), so a run saved on one mesh can be
restored onto another mesh shape.

Several processes: every process calls ``save``/``restore`` for the same steps. Each array is written by
the processes holding its shards (one replica each), the JSON items by process 0, into one directory
on storage all processes share; a checkpoint so written restores under another process count, since
restoring only needs the abstract target of the new layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as preservation

_ITEMS = ("state", "data", "meta")


class RunCheckpointer:
    """Periodic, asynchronous checkpoints of one training run."""

    def __init__(self, directory, *, save_every: int, keep_last: int = 2, keep_every: int | None = None,
                 async_save: bool = True):
        if save_every < 1 or keep_last < 1 or (keep_every is not None and keep_every < 1):
            raise ValueError(f"save_every={save_every}, keep_last={keep_last}, keep_every={keep_every} must be >= 1")
        if keep_every is not None and keep_every % save_every:
            raise ValueError(f"keep_every={keep_every} must be a multiple of save_every={save_every}, "
                             "or the kept steps are never saved")
        policies = [preservation.LatestN(n=keep_last)]
        if keep_every:
            policies.append(preservation.EveryNSteps(interval_steps=keep_every))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            preservation_policy=preservation.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def save(self, step: int, state: Any, *, data_state: dict | None = None, meta: dict | None = None,
             force: bool = False) -> bool:
        """Save if ``step`` is on the cadence (or ``force``); returns whether a save started.

        ``state`` is any pytree of arrays (sharded arrays are written shard by shard from every host);
        ``data_state`` (the data iterator's state) and ``meta`` (config, metrics) must be JSON-able.
        """
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        return self._manager.save(step, args=args, force=force)

    def should_save(self, step: int) -> bool:
        """Whether ``save(step)`` without ``force`` would save (lets callers skip preparing its inputs)."""
        return self._manager.should_save(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of ``step`` (default: the latest complete checkpoint).

        ``abstract_state`` gives every leaf's shape, dtype and sharding (``jax.ShapeDtypeStruct`` with
        ``sharding=``); the restored arrays are placed accordingly, whatever mesh the run was saved on.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

    def read_meta(self, step: int | None = None) -> dict:
        """The ``meta`` item (run config, model config, metrics) of ``step`` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def wait(self) -> None:
        """Block until asynchronous saves have finished (call before exiting or reading the files)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of ``tree`` (with ``shardings`` if given, else the arrays' own)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
