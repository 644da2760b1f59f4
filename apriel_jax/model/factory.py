"""Creating models: abstract (no memory), on one device, or directly sharded over a mesh; a model with
LoRA adapters on an existing (e.g. pretrained) base; a model with its decoder projections quantized."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from apriel_jax.model.apriel import AprielModel
from apriel_jax.model.layers import count_params
from apriel_jax.model.lora import enabled, merge_adapters, split_adapters, with_lora
from apriel_jax.parallel.rules import DEFAULT_RULES, tree_shardings


def param_path(path) -> str:
    """"/"-joined parameter name (``decoder/layers/attn/q/kernel``) from an nnx path (tuple of keys) or a
    jax key path into an nnx.State; the Variable's ``.value`` is not part of the name."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        else:
            parts.append(str(key))
    return "/".join(parts)


def abstract_model(cfg) -> AprielModel:
    """The model with ShapeDtypeStructs instead of arrays: shapes, dtypes, logical axes, no memory."""
    return nnx.eval_shape(lambda: AprielModel(cfg, rngs=nnx.Rngs(0)))


def param_count(cfg) -> int:
    return count_params(nnx.state(abstract_model(cfg), nnx.Param))


def state_shardings(cfg, mesh: Mesh | None, rules=DEFAULT_RULES):
    """A sharding for every parameter: from its logical axes and the rules table on ``mesh``, or the
    default device when ``mesh`` is None."""
    abstract_state = nnx.state(abstract_model(cfg))
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, abstract_state)
    return tree_shardings(nnx.get_partition_spec(abstract_state), abstract_state, mesh, rules)


def create_model(cfg, *, seed: int = 0, mesh: Mesh | None = None, rules=DEFAULT_RULES) -> AprielModel:
    """Randomly initialised model. With a mesh, every parameter is created already sharded (it never
    exists whole on one device), so models larger than one device's memory can be initialised."""
    graphdef = nnx.graphdef(abstract_model(cfg))

    def init():
        return nnx.state(AprielModel(cfg, rngs=nnx.Rngs(seed)))

    shardings = None if mesh is None else state_shardings(cfg, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def model_from_state(cfg, state) -> AprielModel:
    """A model with the given parameter state (e.g. loaded from a checkpoint)."""
    return nnx.merge(nnx.graphdef(abstract_model(cfg)), state)


# How a model is computed, not what its weights are: a run's settings apply to any checkpoint it starts from.
EXECUTION_KEYS = ("remat_policy", "remat_group", "attention_impl")


def with_execution(model: AprielModel, settings) -> AprielModel:
    """``model`` computed as the model config ``settings`` says (remat policy and group, attention kernel),
    its parameters shared. A checkpoint's config carries the settings it was saved with (an HF one the
    defaults: no remat, XLA attention), which are not the memory policy the run was sized for."""
    cfg = model.config.as_configdict()
    if all(cfg.get(k) == settings.get(k, cfg.get(k)) for k in EXECUTION_KEYS):
        return model
    for key in EXECUTION_KEYS:
        if key in settings:
            cfg[key] = settings[key]
    return model_from_state(cfg, nnx.state(model))


def adapted_model(model: AprielModel, lora, *, adapters: nnx.State | None = None, seed: int = 0,
                  mesh: Mesh | None = None, rules=DEFAULT_RULES) -> AprielModel:
    """``model`` (a plain base) with LoRA adapters: ``adapters`` (a state of ``lora_a``/``lora_b`` leaves, e.g.
    read from a PEFT directory), or fresh ones from ``seed`` (A random, B zero: the output is unchanged).
    The base parameters are shared, not copied."""
    base_cfg = model.config.as_configdict()
    if enabled(base_cfg):
        raise ValueError("the model already has LoRA adapters; merge them (export it) before adding new ones")
    cfg = with_lora(base_cfg, lora)
    if adapters is None:
        shardings = None if mesh is None else split_adapters(state_shardings(cfg, mesh, rules))[0]

        # Only the adapter leaves are outputs: XLA drops the base initialisation the trace also contains.
        def init():
            return split_adapters(nnx.state(AprielModel(cfg, rngs=nnx.Rngs(seed))))[0]

        adapters = jax.jit(init, out_shardings=shardings)()
    return model_from_state(cfg, nnx.merge_state(nnx.state(model), adapters))


def merged_model(model: AprielModel) -> AprielModel:
    """The plain model computing what ``model`` does: LoRA adapters folded into their kernels (a model without
    adapters is returned as it is)."""
    if not enabled(model.config):
        return model
    state, cfg = merge_adapters(nnx.state(model), model.config.as_configdict())
    return model_from_state(cfg, state)


def quantized_model(model: AprielModel, mode: str, group_size: int = 128, embeddings: bool = False) -> AprielModel:
    """``model`` with its decoder projections quantized (``model/quant.py``; with ``embeddings`` its token table
    and LM head in int8 too), its other parameters (LoRA adapters included) shared. Quantizes arrays already
    in memory, so the full-precision model must fit: for a large checkpoint use ``from_pretrained(path,
    quant=...)``, which quantizes layer by layer as it reads."""
    from apriel_jax.model.quant import full_precision_path, is_quantized_leaf, is_stacked, quantizer, with_quant

    cfg = model.config.as_configdict()
    if cfg.get("quant") is not None and cfg.quant.mode != "none":
        raise ValueError(f"the model is already quantized ({cfg.quant.mode})")
    cfg = with_quant(cfg, mode, group_size, embeddings)
    weights = {param_path(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    quantized = {}  # full-precision path -> (values, scales)
    flat = []
    for path, abstract in nnx.to_flat_state(nnx.state(abstract_model(cfg))):
        name = param_path(path)
        if not is_quantized_leaf(name):
            flat.append((path, weights[name]))
            continue
        source = full_precision_path(name)
        if source not in quantized:
            fn = quantizer(name, cfg.quant)
            quantized[source] = (jax.vmap(fn) if is_stacked(name) else fn)(weights[source][...])
        flat.append((path, abstract.replace(quantized[source][name.endswith("/qscale")])))
    return model_from_state(cfg, nnx.from_flat_state(flat))
