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


def quantized_model(model: AprielModel, mode: str, group_size: int = 128) -> AprielModel:
    """``model`` with its decoder projections quantized (``model/quant.py``), its other parameters (LoRA
    adapters included) shared. Quantizes arrays already in memory, so the full-precision model must fit:
    for a large checkpoint use ``from_pretrained(path, quant=...)``, which quantizes layer by layer as it reads."""
    from apriel_jax.model.quant import DECODER_PROJECTIONS, kernel_in_axes, quantize, with_quant

    cfg = model.config.as_configdict()
    if cfg.get("quant") is not None and cfg.quant.mode != "none":
        raise ValueError(f"the model is already quantized ({cfg.quant.mode})")
    cfg = with_quant(cfg, mode, group_size)
    abstract = {param_path(p): v for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = param_path(path)
        parent = tuple(name.split("/")[-3:-1])
        if not (name.startswith("decoder/layers/") and name.endswith("/kernel") and parent in DECODER_PROJECTIONS.values()):
            flat.append((path, var))
            continue
        in_axes = kernel_in_axes(name)
        q, s = jax.vmap(lambda w: quantize(w, in_axes, mode, group_size))(var[...])  # over the stacked layers
        owner = path[:-1]
        for leaf, value in (("qkernel", q), ("qscale", s)):
            flat.append(((*owner, leaf), abstract[f"{name.removesuffix('/kernel')}/{leaf}"].replace(value)))
    return model_from_state(cfg, nnx.from_flat_state(flat))
