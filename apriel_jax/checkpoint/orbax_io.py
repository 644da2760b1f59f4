"""Our own model checkpoints: an orbax parameter tree plus the model config as JSON.

Layout of a model directory (local or ``gs://``)::

    DIR/apriel_config.json   model config (ml_collections JSON), written LAST: the directory's marker
    DIR/params/              orbax PyTree checkpoint (OCDBT, uncompressed)

The directory is published through :func:`apriel_jax.storage.new_directory`: locally it is assembled
under a temporary name and renamed into place; on GCS (no rename) it is written in place and the config
file goes last, so an interrupted save never leaves something that loads as a valid checkpoint. Orbax and
tensorstore reach ``gs://`` themselves: the location is passed to them with its scheme.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from apriel_jax import storage
from apriel_jax.model.factory import abstract_model, state_shardings
from apriel_jax.parallel import distributed
from apriel_jax.parallel.rules import DEFAULT_RULES

CONFIG_FILE = "apriel_config.json"
PARAMS_DIR = "params"


def _checkpointer() -> ocp.Checkpointer:
    # Uncompressed: weights barely compress (about 5% with zstd) while compression made a 2 GB save
    # 1.6x slower on CPU. At most 1 GB in flight: orbax's default (96 GB) let a 2 GB restore peak at
    # model + 1.7 GB of host memory; with 1 GB the peak is model + 0.8 GB (benchmarks/convert.py).
    return ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(use_compression=False, restore_concurrent_gb=1, save_concurrent_gb=1)
    )


def is_model_dir(path) -> bool:
    loc = storage.location(path)
    with storage.storage_errors(loc, "read"):
        return (loc / CONFIG_FILE).is_file() and (loc / PARAMS_DIR).is_dir()


def model_dir(path) -> storage.Location:
    """``path`` as a location, after checking it holds a complete model directory (else FileNotFoundError:
    an interrupted save, which has ``params/`` but no config file, is named as such)."""
    loc = storage.location(path)
    if is_model_dir(loc):
        return loc
    with storage.storage_errors(loc, "read"):
        interrupted = (loc / PARAMS_DIR).is_dir()
    if interrupted:
        raise FileNotFoundError(f"{loc}: incomplete model directory: {PARAMS_DIR}/ but no {CONFIG_FILE}, which is "
                                "written last (an interrupted save?); write it again to replace it")
    raise FileNotFoundError(f"{loc} is not an apriel-jax model directory ({CONFIG_FILE} + {PARAMS_DIR}/)")


def save_model(state: nnx.State, cfg, out_dir, *, overwrite: bool = False,
               extra_files: dict[str, bytes] | None = None) -> storage.Location:
    """Save parameters, ``extra_files`` (tokenizer, HF config, ...) and the config to ``out_dir`` (local or
    ``gs://``), which readers trust only once complete (see the module docstring)."""
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    hosts = distributed.hosts()  # several processes: each saves its shards, process 0 the single files
    with storage.new_directory(out_dir, marker=CONFIG_FILE, overwrite=overwrite, hosts=hosts) as tmp:
        if hosts.primary:
            for name, data in (extra_files or {}).items():
                storage.write_bytes(tmp / name, data)
        with _checkpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(nnx.to_pure_dict(state)))
        if hosts.primary:
            storage.write_text(tmp / CONFIG_FILE, json.dumps(cfg_dict, indent=2, sort_keys=True))
    return storage.location(out_dir)


def load_config(path) -> ml_collections.ConfigDict:
    return _read_config(model_dir(path))


def _read_config(loc) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(storage.read_text(loc / CONFIG_FILE)))


def load_state(path, cfg=None, *, mesh: Mesh | None = None, rules=DEFAULT_RULES) -> nnx.State:
    """Restore parameters onto ``mesh`` (any mesh shape) or the default device."""
    loc = model_dir(path)
    cfg = cfg if cfg is not None else _read_config(loc)
    abstract_state = nnx.state(abstract_model(cfg))
    shardings = state_shardings(cfg, mesh, rules)
    target = nnx.to_pure_dict(
        jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    )
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with _checkpointer() as checkpointer, storage.storage_errors(loc, "read"):
        restored = checkpointer.restore(
            loc / PARAMS_DIR, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
    nnx.replace_by_pure_dict(abstract_state, restored)
    return abstract_state


def restore_pure(path, target: dict) -> dict:
    """Restore only the leaves named in ``target`` (a nested dict of ShapeDtypeStructs with shardings, a subset
    of the saved tree): used to read a checkpoint one parameter at a time (``checkpoint/quant_load.py``)."""
    loc = model_dir(path)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with _checkpointer() as checkpointer, storage.storage_errors(loc, "read"):
        return checkpointer.restore(loc / PARAMS_DIR, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
