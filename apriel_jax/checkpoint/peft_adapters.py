"""LoRA adapters in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads onto transformers' ``LlavaForConditionalGeneration``.

Tensor names are the base model's module names (transformers 5.x, the key map's ``hf5`` layout) under
PEFT's ``base_model.model.`` prefix: ``base_model.model.model.language_model.layers.3.self_attn.q_proj.
lora_A.weight``. Like torch Linear weights, ``lora_A.weight`` is [r, in] and ``lora_B.weight`` [out, r];
our A [*in, r] and B [r, *out] flatten their head axes in the same order as the kernel they adapt (HF
q/k/v/o weights are plain reshapes of ours, see ``keymap.py``), so conversion is a reshape and a transpose.

``target_modules`` is written as a regular expression naming exactly the adapted modules: PEFT's list form
would match the vision tower's ``q_proj`` ... too and give it adapters of its own.
"""

from __future__ import annotations

import json
import math
import re

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from apriel_jax import storage
from apriel_jax.checkpoint.hf_export import to_host
from apriel_jax.checkpoint.hf_import import abstract_leaves, name_mismatch
from apriel_jax.checkpoint.keymap import key_map
from apriel_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint, TensorSpec, \
    write_safetensors_checkpoint
from apriel_jax.model.factory import abstract_model, adapted_model, param_path, state_shardings
from apriel_jax.model.lora import DECODER_TARGETS, TARGETS, config_problems, enabled, lora_config, split_adapters, \
    with_lora
from apriel_jax.parallel.rules import DEFAULT_RULES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT saves under the in-memory module names: transformers 5.x's are the key map's hf5 layout; those of
# 4.x before 4.52 (``language_model.model.layers...``) its hf4 layout, read too.
_HF4_PREFIX = _PREFIX + "language_model.model."


def _kernel_path(target: str) -> str:
    if target in DECODER_TARGETS:
        return "decoder/layers/" + "/".join(DECODER_TARGETS[target]) + "/kernel"
    return f"projector/{target}/kernel"


def _modules(cfg, targets, layout: str = "hf5") -> dict[str, tuple[str, bool]]:
    """Adapted kernel path -> (HF module name, ``{i}`` for the layer index; stacked?)."""
    by_path = {m.path: m for m in key_map(cfg, layout)}
    out = {}
    for target in targets:
        m = by_path[_kernel_path(target)]
        out[m.path] = (m.name.removesuffix(".weight"), m.stacked)
    return out


def _target_regex(modules: dict[str, tuple[str, bool]]) -> str:
    names = sorted(re.escape(name).replace(re.escape("{i}"), r"\d+") for name, _ in modules.values())
    return "|".join(names)


def adapter_config(cfg, base_model_name_or_path: str = "") -> dict:
    """The ``adapter_config.json`` of a model config's adapters."""
    lora = cfg.lora
    return {
        "peft_type": "LORA",
        "task_type": None,  # a multimodal model: none of PEFT's task wrappers (CAUSAL_LM expects a text LM)
        "base_model_name_or_path": base_model_name_or_path or None,
        "auto_mapping": {"base_model_class": "LlavaForConditionalGeneration",
                         "parent_library": "transformers.models.llava.modeling_llava"},
        "r": int(lora.rank),
        "lora_alpha": float(lora.alpha),
        "lora_dropout": float(lora.dropout),
        "target_modules": _target_regex(_modules(cfg, lora.target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _to_torch_a(a, rank):
    return a.reshape(-1, rank).T  # [*in, r] -> [r, in]


def _to_torch_b(b, rank):
    return b.reshape(rank, -1).T  # [r, *out] -> [out, r]


def _torch_shape(leaf: str, shape, rank: int) -> tuple[int, int]:
    """The PEFT tensor shape of one layer's A [*in, r] or B [r, *out]."""
    return (rank, math.prod(shape[:-1])) if leaf == "lora_a" else (math.prod(shape[1:]), rank)


def adapter_specs(state: nnx.State, cfg, *, dtype: str | None = None) -> list[TensorSpec]:
    """One lazily produced TensorSpec per PEFT adapter tensor (one layer gathered to the host at a time)."""
    arrays = {}
    jax.tree_util.tree_map_with_path(lambda p, x: arrays.__setitem__(param_path(p), x), state)
    rank = int(cfg.lora.rank)
    specs = []
    for path, (module, stacked) in _modules(cfg, cfg.lora.target_modules).items():
        owner = path.removesuffix("/kernel")
        for leaf, torch_name, convert in (("lora_a", "lora_A", _to_torch_a), ("lora_b", "lora_B", _to_torch_b)):
            array = arrays[f"{owner}/{leaf}"]
            out_dtype = np.dtype(jax.numpy.dtype(dtype)) if dtype else array.dtype
            shape = _torch_shape(leaf, array.shape[1:] if stacked else array.shape, rank)
            for i in range(array.shape[0]) if stacked else [None]:

                def produce(array=array, i=i, convert=convert, out_dtype=out_dtype):
                    host = to_host(array if i is None else array[i])
                    return np.ascontiguousarray(convert(host, rank)).astype(out_dtype, copy=False)

                name = _PREFIX + (module if i is None else module.format(i=i)) + f".{torch_name}.weight"
                specs.append(TensorSpec(name, shape, out_dtype, produce))
    return sorted(specs, key=lambda s: s.name)


def export_peft(state: nnx.State, cfg, out_dir, *, base_model_name_or_path: str = "", dtype: str | None = None,
                overwrite: bool = False) -> storage.Location:
    """Write the adapters of ``state`` (a model with a ``lora`` config) as a PEFT adapter directory (local or
    ``gs://``; ``adapter_config.json`` is its marker, written last). ``base_model_name_or_path``: the HF
    checkpoint the adapters apply to, recorded for ``PeftModel.from_pretrained`` users."""
    if not enabled(cfg):
        raise ValueError("the model has no LoRA adapters to export (its config has no lora block with rank > 0)")
    extra = {ADAPTER_CONFIG: json.dumps(adapter_config(cfg, base_model_name_or_path), indent=2)}
    write_safetensors_checkpoint(out_dir, adapter_specs(state, cfg, dtype=dtype), max_shard_bytes=2**62,
                                 single_file_name=ADAPTER_WEIGHTS, extra_files=extra, overwrite=overwrite)
    return storage.location(out_dir)


# ------------------------------------------------------------------------------------------ import


def _lora_from_config(config: dict, where) -> ml_collections.ConfigDict:
    """The settings of an adapter_config.json, refusing the PEFT variants our adapters do not compute."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [key for key, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False),
                                          ("rank_pattern", {}), ("alpha_pattern", {}), ("bias", "none"))
                   if config.get(key, plain) not in (plain, None)]
    if unsupported:
        raise CheckpointError(f"{where}: LoRA variant not supported ({', '.join(unsupported)} set); plain LoRA only")
    return lora_config(rank=int(config["r"]), alpha=float(config.get("lora_alpha", 8)),
                       dropout=float(config.get("lora_dropout", 0.0)), target_modules=())


def _adapter_tensors(cfg, layout: str) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """PEFT tensor name -> (our adapter path, layer index or None, torch shape) for a config with adapters."""
    abstract, rank = abstract_leaves(cfg), int(cfg.lora.rank)
    out = {}
    for path, (module, stacked) in _modules(cfg, cfg.lora.target_modules, layout).items():
        owner = path.removesuffix("/kernel")
        for leaf, torch_name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            full = abstract[f"{owner}/{leaf}"].shape
            shape = _torch_shape(leaf, full[1:] if stacked else full, rank)
            for i in range(full[0]) if stacked else [None]:
                name = _PREFIX + (module if i is None else module.format(i=i)) + f".{torch_name}.weight"
                out[name] = (f"{owner}/{leaf}", i, shape)
    return out


def _targets_in(names: set[str], base_cfg, layout: str) -> list[str]:
    """The targets whose first adapted layer has tensors in the file."""
    found = []
    for target in TARGETS:
        (module, stacked), = _modules(base_cfg, [target], layout).values()
        if _PREFIX + (module.format(i=0) if stacked else module) + ".lora_A.weight" in names:
            found.append(target)
    return found


def read_adapter_config(path) -> ml_collections.ConfigDict:
    """The LoRA settings of the PEFT directory ``path`` (CheckpointError: not one, or not plain LoRA)."""
    config_file = storage.location(path) / ADAPTER_CONFIG
    with storage.storage_errors(config_file, "read"):
        if not config_file.is_file():
            raise CheckpointError(f"{storage.location(path)}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    return _lora_from_config(json.loads(storage.read_text(config_file)), config_file)


def read_adapters(path, base_cfg, *, mesh: Mesh | None = None, rules=DEFAULT_RULES):
    """(lora config, adapter state) of the PEFT directory ``path`` for a base model with config ``base_cfg``,
    sharded over ``mesh`` if given. Everything is checked before the adapters are built: the adapter
    must be plain LoRA on modules we adapt, and every tensor must be there with the shape the base model
    gives it, so an adapter trained on another base model is refused (CheckpointError) with the reason."""
    loc = storage.location(path)
    lora = read_adapter_config(path)
    source = SafetensorsCheckpoint(path, ADAPTER_WEIGHTS)
    names = set(source.keys())
    layout = "hf4" if any(n.startswith(_HF4_PREFIX) for n in names) else "hf5"
    lora.target_modules = tuple(_targets_in(names, base_cfg, layout))
    if not lora.target_modules:
        raise CheckpointError(f"{loc}: the adapter adapts none of the modules apriel-jax adapts "
                              f"({', '.join(TARGETS)} of the decoder layers and the projector); first tensors: "
                              f"{', '.join(sorted(names)[:4])}")
    cfg = with_lora(base_cfg, lora)
    problems = config_problems(cfg)
    if problems:
        raise CheckpointError(f"{loc}: the adapter does not fit the base model: " + "; ".join(problems))
    expected = _adapter_tensors(cfg, layout)
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        header = f"adapter {loc} was not made for this base model ({base_cfg.decoder.num_layers} decoder layers):"
        raise CheckpointError("\n".join(name_mismatch(header, missing, unexpected, examples=4)))
    for name, (_, _, shape) in sorted(expected.items()):
        if tuple(source.shape(name)) != shape:
            raise CheckpointError(
                f"adapter tensor {name} in {loc} has shape {tuple(source.shape(name))}, but the base model "
                f"expects {shape} (rank {lora.rank}): the adapter was trained on a different base model")
    return lora, _build_adapters(source, cfg, expected, mesh, rules)


def _build_adapters(source, cfg, expected, mesh, rules) -> nnx.State:
    """The adapter state of ``cfg``'s model from the checked PEFT tensors (stacked over layers)."""
    names = {(path, i): name for name, (path, i, _) in expected.items()}
    dtype = jax.numpy.dtype(cfg.param_dtype)

    def build(keypath, leaf, sharding):
        path = param_path(keypath)
        if (path, None) in names:
            value = source.get(names[path, None]).T.reshape(leaf.shape)
        else:
            value = np.stack([source.get(names[path, i]).T.reshape(leaf.shape[1:]) for i in range(leaf.shape[0])])
        value = np.asarray(value, dtype=dtype)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: value[index])

    abstract = split_adapters(nnx.state(abstract_model(cfg)))[0]
    shardings = split_adapters(state_shardings(cfg, mesh, rules))[0]
    return jax.tree_util.tree_map_with_path(build, abstract, shardings)


def _mesh_of(model) -> Mesh | None:
    """The mesh ``model``'s arrays are placed on (None when they are not on a named mesh)."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return None


def load_peft(path, model, *, mesh: Mesh | None = None, rules=DEFAULT_RULES):
    """``model`` (a plain or quantized base model) with the adapters of the PEFT directory ``path``, sharded
    over ``mesh`` (default: the mesh the model's arrays are on, so that adapters and weights meet in the
    same computations)."""
    mesh = mesh or _mesh_of(model)
    lora, adapters = read_adapters(path, model.config.as_configdict(), mesh=mesh, rules=rules)
    return adapted_model(model, lora, adapters=adapters)
