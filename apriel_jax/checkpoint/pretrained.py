"""``from_pretrained`` and the conversions behind ``apriel-jax convert``.

A source directory is recognised by its files: ``config.json`` + safetensors (Hugging Face),
``params.json`` + ``consolidated.safetensors`` (Mistral), or ``apriel_config.json`` + ``params/`` (ours).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jax
from jax.sharding import Mesh

from apriel_jax.checkpoint import hf_export, hf_import, mistral, orbax_io
from apriel_jax.checkpoint.hf_config import ConfigError, from_hf_config
from apriel_jax.checkpoint.safetensors_io import SafetensorsCheckpoint, write_safetensors_checkpoint
from apriel_jax.model.factory import model_from_state
from apriel_jax.parallel.rules import DEFAULT_RULES


def detect_format(path) -> str:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if orbax_io.is_model_dir(path):
        return "orbax"
    if (path / "params.json").is_file():
        return "mistral"
    if (path / "config.json").is_file():
        return "hf"
    raise ConfigError(f"{path}: not a checkpoint (no config.json, params.json or {orbax_io.CONFIG_FILE})")


def read_hf_config(path):
    try:
        return from_hf_config(json.loads((Path(path) / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}/config.json: invalid JSON ({e})") from None


def _stored_dtype(source: SafetensorsCheckpoint) -> str:
    """The dtype most of the checkpoint's bytes are stored in."""
    totals = Counter()
    for name in source.keys():
        totals[str(source.dtype(name))] += source.nbytes(name)
    return totals.most_common(1)[0][0] if totals else "float32"


def load_config_and_state(path, *, dtype: str | None = None, param_dtype: str | None = None,
                          mesh: Mesh | None = None, rules=DEFAULT_RULES):
    """(config, parameter state) from any supported checkpoint directory.

    ``param_dtype`` defaults to the dtype stored in the checkpoint, ``dtype`` (compute) to param_dtype.
    """
    fmt = detect_format(path)
    if fmt == "orbax":
        cfg = orbax_io.load_config(path)
        state = orbax_io.load_state(path, cfg, mesh=mesh, rules=rules)
        if param_dtype and param_dtype != cfg.param_dtype:
            state = jax.tree.map(lambda a: a.astype(param_dtype), state)
            cfg.param_dtype = param_dtype
        cfg.dtype = dtype or cfg.param_dtype
        return cfg, state
    cfg = read_hf_config(path) if fmt == "hf" else mistral.from_params_json(mistral.read_params_json(path))
    source = SafetensorsCheckpoint(path)
    cfg.param_dtype = param_dtype or _stored_dtype(source)
    cfg.dtype = dtype or cfg.param_dtype
    layout = "mistral" if fmt == "mistral" else None
    return cfg, hf_import.load_state(source, cfg, layout=layout, mesh=mesh, rules=rules)


def from_pretrained(path, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh: Mesh | None = None, rules=DEFAULT_RULES):
    """Load an HF directory, a Mistral consolidated directory or an apriel-jax checkpoint.

    Returns the model; its config is ``model.config``. With ``mesh``, parameters are read straight
    into their shards.
    """
    cfg, state = load_config_and_state(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    return model_from_state(cfg, state)


def hf_to_orbax(src, dst, *, param_dtype: str | None = None, overwrite: bool = False):
    cfg, state = load_config_and_state(src, param_dtype=param_dtype)
    extra = hf_export.sidecars(src)
    if (Path(src) / "config.json").is_file():
        extra[hf_export.HF_CONFIG_COPY] = (Path(src) / "config.json").read_bytes()
    return orbax_io.save_model(state, cfg, dst, overwrite=overwrite, extra_files=extra)


def orbax_to_hf(src, dst, *, dtype: str | None = None, overwrite: bool = False, max_shard_bytes=5 * 2**30):
    cfg = orbax_io.load_config(src)
    state = orbax_io.load_state(src, cfg)
    return hf_export.export_hf(state, cfg, dst, dtype=dtype, source_dir=src, overwrite=overwrite,
                               max_shard_bytes=max_shard_bytes)


def mistral_to_hf(src, dst, *, dtype: str | None = None, overwrite: bool = False, max_shard_bytes=5 * 2**30):
    cfg, state = load_config_and_state(src)
    return hf_export.export_hf(state, cfg, dst, dtype=dtype, source_dir=src, overwrite=overwrite,
                               max_shard_bytes=max_shard_bytes)


def hf_to_mistral(src, dst, *, dtype: str | None = None, overwrite: bool = False):
    """The inverse of mistral_to_hf: consolidated.safetensors + params.json."""
    cfg, state = load_config_and_state(src)
    specs = hf_export.tensor_specs(state, cfg, layout="mistral", dtype=dtype)
    write_safetensors_checkpoint(
        dst, specs, max_shard_bytes=2**62, single_file_name="consolidated.safetensors",
        extra_files={"params.json": json.dumps(mistral.to_params_json(cfg), indent=2)}, overwrite=overwrite,
    )
    return Path(dst)
