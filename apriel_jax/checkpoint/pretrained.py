"""``from_pretrained`` and the conversions behind ``apriel-jax convert``.

A source directory (local or ``gs://``) is recognised by its files: ``config.json`` + safetensors
(Hugging Face), ``params.json`` + ``consolidated.safetensors`` (Mistral), or ``apriel_config.json`` +
``params/`` (ours). Those config files are also the directories' markers: our writers write them last,
so weights without one are an interrupted write (on GCS, where a directory cannot appear at once) and
are refused.
"""

from __future__ import annotations

import json
from collections import Counter

import jax
from jax.sharding import Mesh

from apriel_jax import storage
from apriel_jax.checkpoint import hf_export, hf_import, mistral, orbax_io, peft_adapters, quant_load
from apriel_jax.checkpoint.hf_config import ConfigError, from_hf_config
from apriel_jax.checkpoint.safetensors_io import SafetensorsCheckpoint, write_safetensors_checkpoint
from apriel_jax.model.factory import model_from_state, param_path
from apriel_jax.model.quant import DEFAULT_GROUP_SIZE, MODES, config_problems as quant_problems, enabled as quant_enabled, \
    embeddings_enabled as quant_embeddings_enabled, is_quantized_leaf, with_quant
from apriel_jax.parallel.rules import DEFAULT_RULES


def _names(loc) -> set[str]:
    """Names of the entries of the directory ``loc`` (one listing request on GCS)."""
    try:
        with storage.storage_errors(loc, "read"):
            return {p.name for p in loc.iterdir()}
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{loc}: no such checkpoint directory") from None


def detect_format(path) -> str:
    loc = storage.location(path)
    names = _names(loc)
    if orbax_io.CONFIG_FILE in names and orbax_io.PARAMS_DIR in names:
        return "orbax"
    if "params.json" in names:
        return "mistral"
    if "config.json" in names:
        return "hf"
    if orbax_io.PARAMS_DIR in names:
        raise ConfigError(f"{loc}: incomplete checkpoint: {orbax_io.PARAMS_DIR}/ but no {orbax_io.CONFIG_FILE}, "
                          "which is written last (an interrupted save?); write it again to replace it")
    if any(name.endswith(".safetensors") for name in names):
        raise ConfigError(f"{loc}: incomplete checkpoint: safetensors but no config.json or params.json, which is "
                          "written last (an interrupted write?); write it again to replace it")
    raise ConfigError(f"{loc}: not a checkpoint (no config.json, params.json or {orbax_io.CONFIG_FILE})")


def read_hf_config(path):
    config = storage.location(path) / "config.json"
    try:
        return from_hf_config(json.loads(storage.read_text(config)))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config}: invalid JSON ({e})") from None


def _stored_dtype(source: SafetensorsCheckpoint) -> str:
    """The dtype most of the checkpoint's bytes are stored in."""
    totals = Counter()
    for name in source.keys():
        totals[str(source.dtype(name))] += source.nbytes(name)
    return totals.most_common(1)[0][0] if totals else "float32"


def _with_dtype(state, param_dtype: str):
    """``state`` with every full-precision leaf in ``param_dtype`` (quantized leaves keep theirs)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, a: a if is_quantized_leaf(param_path(p)) else a.astype(param_dtype), state)


def _quantized(cfg, quant: str | None, group_size: int, embeddings: bool, where):
    """``cfg`` with the requested quantization; a checkpoint stored quantized loads only as it is."""
    if quant is not None and quant not in MODES:
        raise ValueError(f"quant={quant!r} is not one of {MODES}")
    if quant_enabled(cfg):
        stored = (cfg.quant.mode, cfg.quant.group_size, quant_embeddings_enabled(cfg))
        if quant not in (None, cfg.quant.mode) or (quant == cfg.quant.mode and (group_size, embeddings) != stored[1:]):
            raise ConfigError(f"{where} is stored quantized ({cfg.quant.mode}, group size {cfg.quant.group_size}, "
                              f"embeddings {stored[2]}); it loads only as stored, not as quant={quant!r} (group size "
                              f"{group_size}, embeddings {embeddings})")
        return cfg
    if not quant:
        return cfg
    quantized = with_quant(cfg, quant, group_size, embeddings)
    problems = quant_problems(quantized)
    if problems:  # e.g. an int4 group that does not divide a projection's input: before any weight is read
        raise ConfigError(f"{where} cannot load as quant={quant!r}: " + "; ".join(problems))
    return quantized


def load_config_and_state(path, *, dtype: str | None = None, param_dtype: str | None = None,
                          mesh: Mesh | None = None, rules=DEFAULT_RULES, quant: str | None = None,
                          group_size: int = DEFAULT_GROUP_SIZE, quant_embeddings: bool = False):
    """(config, parameter state) from any supported checkpoint directory.

    ``param_dtype`` defaults to the dtype stored in the checkpoint, ``dtype`` (compute) to param_dtype.
    ``quant`` ("int8" / "int4"; ``model/quant.py``) quantizes the decoder projections as they are read,
    ``quant_embeddings`` the token table and LM head too (int8).
    """
    fmt = detect_format(path)
    if fmt == "orbax":
        stored = orbax_io.load_config(path)
        cfg = _quantized(stored, quant, group_size, quant_embeddings, storage.location(path))
        if quant_enabled(cfg) and not quant_enabled(stored):
            state = quant_load.load_orbax_quantized(path, cfg, mesh=mesh, rules=rules)
        else:
            state = orbax_io.load_state(path, cfg, mesh=mesh, rules=rules)
        if param_dtype and param_dtype != cfg.param_dtype:
            state = _with_dtype(state, param_dtype)
            cfg.param_dtype = param_dtype
        cfg.dtype = dtype or cfg.param_dtype
        return cfg, state
    cfg = read_hf_config(path) if fmt == "hf" else mistral.from_params_json(mistral.read_params_json(path))
    source = SafetensorsCheckpoint(path)
    cfg.param_dtype = param_dtype or _stored_dtype(source)
    cfg.dtype = dtype or cfg.param_dtype
    cfg = _quantized(cfg, quant, group_size, quant_embeddings, storage.location(path))
    layout = "mistral" if fmt == "mistral" else None
    return cfg, hf_import.load_state(source, cfg, layout=layout, mesh=mesh, rules=rules)


def from_pretrained(path, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh: Mesh | None = None, rules=DEFAULT_RULES, quant: str | None = None,
                    group_size: int = DEFAULT_GROUP_SIZE, quant_embeddings: bool = False):
    """Load an HF directory, a Mistral consolidated directory or an apriel-jax checkpoint.

    Returns the model; its config is ``model.config``. With ``mesh``, parameters are read straight
    into their shards. ``quant`` ("int8" or "int4", ``group_size`` for int4) stores the decoder's seven
    projections quantized (``apriel_jax/model/quant.py``), quantizing them one layer at a time as they are
    read; with ``quant_embeddings`` the token table and the LM head are stored in int8 too. A checkpoint
    saved quantized loads quantized whatever ``quant`` says (None or its own settings).
    """
    cfg, state = load_config_and_state(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
                                       quant=quant, group_size=group_size, quant_embeddings=quant_embeddings)
    return model_from_state(cfg, state)


def hf_to_orbax(src, dst, *, param_dtype: str | None = None, overwrite: bool = False):
    cfg, state = load_config_and_state(src, param_dtype=param_dtype)
    extra = hf_export.sidecars(src)
    config = storage.location(src) / "config.json"
    with storage.storage_errors(config, "read"):
        has_config = config.is_file()
    if has_config:
        extra[hf_export.HF_CONFIG_COPY] = storage.read_bytes(config)
    return orbax_io.save_model(state, cfg, dst, overwrite=overwrite, extra_files=extra)


def orbax_to_hf(src, dst, *, dtype: str | None = None, overwrite: bool = False, max_shard_bytes=5 * 2**30,
                mesh: Mesh | None = None):
    """With ``mesh`` the parameters are restored sharded over it (a multi-host job: no host holds the whole
    model; each tensor is gathered in turn while it is written)."""
    cfg = orbax_io.load_config(src)
    state = orbax_io.load_state(src, cfg, mesh=mesh)
    return hf_export.export_hf(state, cfg, dst, dtype=dtype, source_dir=src, overwrite=overwrite,
                               max_shard_bytes=max_shard_bytes)


def orbax_to_peft(src, dst, *, base_model_name_or_path: str = "", dtype: str | None = None,
                  overwrite: bool = False, mesh: Mesh | None = None):
    """The LoRA adapters of an apriel-jax checkpoint as a PEFT adapter directory (orbax_to_hf writes the
    same model merged)."""
    cfg = orbax_io.load_config(src)
    state = orbax_io.load_state(src, cfg, mesh=mesh)
    return peft_adapters.export_peft(state, cfg, dst, base_model_name_or_path=base_model_name_or_path,
                                     dtype=dtype, overwrite=overwrite)


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
    return storage.location(dst)
