"""Write model parameters as a Hugging Face ``LlavaForConditionalGeneration`` checkpoint (or in Mistral's
consolidated format): sharded safetensors + index + config.json (+ tokenizer files).

Tensors are produced one at a time (one layer of one stacked parameter gathered to the host, converted,
written, dropped), so host memory stays near one tensor. With several processes (a multi-host job) every
process gathers each tensor in turn and process 0 writes it. The output directory (local or ``gs://``) is
published through ``storage.new_directory``: locally it appears atomically and a failed export leaves
nothing behind; on GCS its marker (config.json, or params.json in the Mistral layout) is written last
and readers refuse the directory without it.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx

from apriel_jax import storage
from apriel_jax.checkpoint.hf_config import to_hf_config
from apriel_jax.checkpoint.keymap import key_map
from apriel_jax.model.factory import param_path
from apriel_jax.model.lora import enabled as lora_enabled, merged_kernel
from apriel_jax.model.quant import enabled as quant_enabled
from apriel_jax.checkpoint.safetensors_io import TensorSpec, write_safetensors_checkpoint

# Files that travel with the weights when the source checkpoint had them. An orbax model directory
# keeps the source's config.json as hf_config.json, so token ids survive HF -> orbax -> HF.
HF_CONFIG_COPY = "hf_config.json"
SIDECAR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "tekken.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)


def _np_dtype(name: str):
    return jax.numpy.dtype(name)  # handles "bfloat16" through ml_dtypes


def to_host(array) -> np.ndarray:
    """The whole of ``array`` as a NumPy array. An array sharded over several processes is gathered: a
    collective, so every process produces the same tensors in the same order (only process 0 writes)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def tensor_specs(state: nnx.State, cfg, *, layout: str = "hf4", dtype: str | None = None) -> list[TensorSpec]:
    """One lazily produced TensorSpec per checkpoint tensor, in name order. A model with LoRA adapters is
    written merged (W + alpha/r * A @ B, one layer at a time as it is written): the plain checkpoint that
    computes the same function. A quantized model is refused: its export would be the rounded weights."""
    if quant_enabled(cfg):
        raise ValueError(
            f"the model's decoder projections are quantized ({cfg.quant.mode}): an HF export would write the rounded "
            "weights in place of the original ones. Export the LoRA adapters (export_peft / convert orbax-to-peft) and "
            "apply them to the full-precision checkpoint, or load that without quant and export it")
    arrays = {}
    jax.tree_util.tree_map_with_path(lambda p, x: arrays.__setitem__(param_path(p), x), state)
    scale = cfg.lora.alpha / cfg.lora.rank if lora_enabled(cfg) else 0.0
    specs = []
    for m in key_map(cfg, layout):
        array = arrays[m.path]
        owner = m.path.removesuffix("/kernel")
        adapter = (arrays[f"{owner}/lora_a"], arrays[f"{owner}/lora_b"]) if f"{owner}/lora_a" in arrays else None
        out_dtype = _np_dtype(dtype) if dtype else array.dtype
        layers = range(array.shape[0]) if m.stacked else [None]
        for i in layers:
            part_shape = array.shape[1:] if m.stacked else array.shape
            shape = jax.eval_shape(m.to_ext, jax.ShapeDtypeStruct(part_shape, np.float32)).shape

            def produce(m=m, array=array, adapter=adapter, i=i, out_dtype=out_dtype):
                host, *a_b = (to_host(x if i is None else x[i]) for x in (array, *(adapter or ())))
                if a_b:
                    host = np.asarray(merged_kernel(host, *a_b, scale))
                return np.ascontiguousarray(m.to_ext(host)).astype(out_dtype, copy=False)

            specs.append(TensorSpec(m.name if i is None else m.name.format(i=i), tuple(shape), out_dtype, produce))
    return sorted(specs, key=lambda s: s.name)


def export_hf(state: nnx.State, cfg, out_dir, *, dtype: str | None = None, source_dir=None,
              token_ids: dict[str, int] | None = None, max_shard_bytes: int = 5 * 2**30,
              overwrite: bool = False, layout: str = "hf4") -> storage.Location:
    """Write an HF checkpoint directory (local or ``gs://``; config.json is its marker, written last)
    that ``LlavaForConditionalGeneration.from_pretrained`` loads. LoRA adapters are merged into the
    weights (``checkpoint/peft_adapters.py`` writes them on their own).

    ``dtype`` is the stored dtype (default: the parameters' own). Tokenizer, chat template and
    processor files are copied from ``source_dir`` when it has them. ``token_ids`` (bos/eos/pad ids for
    config.json) default to those of the source's HF config, so a tokenizer's ids are never replaced
    by defaults.
    """
    leaves = jax.tree.leaves(state)
    stored = dtype or str(leaves[0].dtype)
    ids = token_ids if token_ids is not None else source_token_ids(source_dir)
    extra = {"config.json": json.dumps(to_hf_config(cfg, dtype=stored, token_ids=ids), indent=2)}
    extra.update(sidecars(source_dir))
    write_safetensors_checkpoint(
        out_dir, tensor_specs(state, cfg, layout=layout, dtype=dtype), max_shard_bytes=max_shard_bytes,
        extra_files=extra, overwrite=overwrite,
    )
    return storage.location(out_dir)


def _files_in(source_dir, names) -> list:
    """Locations of those of ``names`` that are files in ``source_dir`` (one listing, also on GCS)."""
    loc = storage.location(source_dir)
    with storage.storage_errors(loc, "read"):
        if not loc.is_dir():
            return []
        present = {p.name for p in loc.iterdir()}
        return [loc / name for name in names if name in present and (loc / name).is_file()]


def sidecars(source_dir) -> dict[str, bytes]:
    """Tokenizer/processor files of ``source_dir`` (name -> bytes) to carry into a converted checkpoint."""
    if source_dir is None:
        return {}
    return {path.name: storage.read_bytes(path) for path in _files_in(source_dir, SIDECAR_FILES)}


def source_token_ids(source_dir) -> dict[str, int] | None:
    """bos/eos/pad ids from the source's HF config (config.json, or the copy in an orbax directory)."""
    if source_dir is None:
        return None
    for path in _files_in(source_dir, ("config.json", HF_CONFIG_COPY)):
        hf = json.loads(storage.read_text(path))
        text = hf.get("text_config", {})
        ids = {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = text.get(key, hf.get(key))
            if value is not None:
                ids[key] = value
        return ids
    return None
