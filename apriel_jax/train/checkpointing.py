"""Run checkpoints: train state + data-iterator state + run metadata, in one orbax step directory.

Retention keeps the last ``keep_last`` checkpoints *and* every ``keep_every``-th step forever: the
stage runner averages equispaced checkpoints (the paper averages 6 over the upscaling stage and 3 over
CPT-1), so those must survive the rolling window.

The directory is local or ``gs://`` (``apriel_jax.storage.location``; orbax and tensorstore write to
GCS themselves). A save interrupted by a crash or SIGKILL never loads as valid: locally orbax writes
each step under a temporary name and renames it on success; on GCS, which cannot rename, it writes the
step in place and commits it with a ``commit_success.txt`` object written last. On start-up it ignores
and deletes both kinds of leftovers (a temporary directory, a step without its commit object).
Restoring takes an abstract target (shapes, dtypes and shardings), so a run saved on one mesh can be
restored onto another mesh shape.

Storage failures while saving (a full disk, no such bucket, permission denied, a failed upload) are
raised as ``storage.StorageError`` naming the directory and the cause in one line, whether they surface in
:meth:`RunCheckpointer.save` or, for an asynchronous save, in :meth:`~RunCheckpointer.check_for_errors`
(the training loop asks after every step), :meth:`~RunCheckpointer.wait` or the next ``save``.

A damaged checkpoint (a file deleted or truncated after it was committed) is found when it is restored:
:meth:`RunCheckpointer.restore_latest` then falls back to the newest older checkpoint that restores whole,
moves the damaged ones aside into ``<directory>.damaged/`` (kept, not deleted) and says so in one line
each. A checkpoint is only ever set aside after an older one restored with the same target, so a
checkpoint that does not fit the run's config (a model change) is never mistaken for a damaged one.

Several processes: every process calls ``save``/``restore`` for the same steps. Each array is written by
the processes holding its shards (one replica each), the JSON items by process 0, into one directory
on storage all processes share; a checkpoint so written restores under another process count, since
restoring only needs the abstract target of the new layout.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as preservation

from apriel_jax import storage
from apriel_jax.storage.errors import io_failure

_ITEMS = ("state", "data", "meta")


class CheckpointDamaged(storage.StorageError):
    """The latest checkpoint cannot be restored and no fallback was allowed or possible (a bad state of
    the storage, not of the code: the CLI reports it in one line)."""


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
        self.directory = storage.location(directory)
        with storage.storage_errors(self.directory, "open"):
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    @contextlib.contextmanager
    def _writing(self):
        """Failures of a save as one-line StorageErrors naming the directory: ``storage_errors`` names
        missing buckets, refused permissions and absent credentials; any other I/O failure (a full disk, a
        connection that kept failing after the clients' retries, which tensorstore reports as a
        ValueError carrying a status) is summarised to its cause. Anything else (a bug) is re-raised."""
        try:
            with storage.storage_errors(self.directory, "write"):
                yield
        except storage.StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised when not an I/O failure
            cause = io_failure(err)
            if cause is None:
                raise
            raise storage.StorageError(f"{self.directory}: cannot write the checkpoint: {cause}") from err

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
        with self._writing():
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
        with storage.storage_errors(self.directory / str(step), "read"):
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

    def restore_latest(self, abstract_state: Any, *, fallback: bool = True,
                       log=print) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest checkpoint that restores whole; None without any.

        Newer checkpoints that fail with an I/O failure (a missing or truncated file) are skipped, and
        once an older one has restored they are moved aside and reported (see the module docstring).
        Without ``fallback``, or when no checkpoint restores, :class:`CheckpointDamaged` names the newest
        failure. A failure that is no I/O failure (a target that does not fit) is raised as it is.
        """
        from apriel_jax.parallel import distributed

        failed: list[tuple[int, str, BaseException]] = []
        for step in sorted(self.all_steps(), reverse=True):
            error = None
            try:
                restored = self.restore(abstract_state, step)
            except Exception as err:  # noqa: BLE001 - classified below
                if io_failure(err) is None:
                    raise
                error = err
            # Every process must resume from the same step, even if only some of them read a damaged file.
            if distributed.any_process(error is not None):
                failed.append((step, io_failure(error) if error else "damaged on another process", error))
                if not fallback:
                    break
                continue
            for bad, cause, _ in failed:
                aside = self._set_aside(bad)
                log(f"checkpoint step {bad} cannot be restored ({cause}); moved to {aside}; resuming from "
                    f"step {step}, the newest intact checkpoint")
            return (step, *restored)
        if not failed:
            return None
        step, cause, err = failed[0]
        why = ("checkpoint.fallback is off" if not fallback else
               "no older checkpoint restores either (nothing was moved)")
        raise CheckpointDamaged(f"{self.directory / str(step)}: the latest checkpoint cannot be restored: {cause}; "
                                f"{why}") from err

    def _set_aside(self, step: int) -> storage.Location:
        """Move a damaged step out of the checkpoint directory (process 0; the others wait)."""
        from apriel_jax.parallel import distributed

        damaged = self.directory.parent / f"{self.directory.name}.damaged"
        target = damaged / str(step)
        if jax.process_index() == 0:
            n = 1
            while target.exists():  # an earlier fallback kept a step of the same number
                target, n = damaged / f"{step}-{n}", n + 1
            storage.move_tree(self.directory / str(step), target)
        distributed.any_process(False)  # a barrier: the step is gone before anyone lists the directory again
        self._manager.reload()
        return target

    def check_for_errors(self) -> None:
        """Raise (StorageError) if an asynchronous save that has finished failed: called after every step,
        so a full disk stops the run at the next step, not at the next save."""
        with self._writing():
            self._manager.check_for_errors()

    def read_meta(self, step: int | None = None) -> dict:
        """The ``meta`` item (run config, model config, metrics) of ``step`` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
        with storage.storage_errors(self.directory / str(step), "read"):
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def wait(self) -> None:
        """Block until asynchronous saves have finished (call before exiting or reading the files)."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._writing():
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
