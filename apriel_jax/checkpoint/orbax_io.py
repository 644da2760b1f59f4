"""Our own model checkpoints: an orbax parameter tree plus the model config as JSON.

Layout of a model directory::

    DIR/apriel_config.json   model config (ml_collections JSON)
    DIR/params/              orbax PyTree checkpoint (OCDBT, uncompressed)

The directory is assembled under a temporary name and renamed into place last, so an interrupted
save never leaves something that loads as a valid checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from apriel_jax.model.factory import abstract_model, state_shardings
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
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_model(state: nnx.State, cfg, out_dir, *, overwrite: bool = False,
               extra_files: dict[str, bytes] | None = None) -> Path:
    """Save parameters, config and ``extra_files`` (tokenizer, HF config, ...) to ``out_dir`` atomically."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (allow overwriting to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg_dict, indent=2, sort_keys=True))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        with _checkpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(nnx.to_pure_dict(state)))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_config(model_dir) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))


def load_state(model_dir, cfg=None, *, mesh: Mesh | None = None, rules=DEFAULT_RULES) -> nnx.State:
    """Restore parameters onto ``mesh`` (any mesh shape) or the default device."""
    model_dir = Path(model_dir).absolute()
    if not is_model_dir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not an apriel-jax model directory ({CONFIG_FILE} + {PARAMS_DIR}/)")
    cfg = cfg if cfg is not None else load_config(model_dir)
    abstract_state = nnx.state(abstract_model(cfg))
    shardings = state_shardings(cfg, mesh, rules)
    target = nnx.to_pure_dict(
        jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    )
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with _checkpointer() as checkpointer:
        restored = checkpointer.restore(
            model_dir / PARAMS_DIR, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
    nnx.replace_by_pure_dict(abstract_state, restored)
    return abstract_state
