"""Stream a checkpoint (HF Llava safetensors or Mistral consolidated) into (sharded) model parameters.

Everything is checked before a byte of weight data is read: every expected tensor present, nothing
unexpected, every shape and dtype right. Then each parameter is built with
``jax.make_array_from_callback``: a device asks for its shard, and the callback reads just those
tensors (memory-mapped) for just that slice. Host memory stays near one tensor, never the model.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from apriel_jax.checkpoint.keymap import TensorMap, detect_layout, expand, key_map
from apriel_jax.checkpoint.quant_load import quantized_leaf
from apriel_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from apriel_jax.model.factory import abstract_model, param_path, state_shardings
from apriel_jax.model.quant import enabled as quant_enabled, full_precision_path, is_quantized_leaf, without_quant
from apriel_jax.parallel.rules import DEFAULT_RULES

# Buffers some exporters save that carry no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FLOAT_KINDS = ("f",)


def _expected_tensors(cfg, layout: str):
    maps = key_map(cfg, layout)
    layers = {"vision": cfg.vision.num_layers, "decoder": cfg.decoder.num_layers, "projector": 0}
    return maps, expand(maps, layers)


def _layer_shape(abstract_leaf, m: TensorMap) -> tuple[int, ...]:
    return tuple(abstract_leaf.shape[1:] if m.stacked else abstract_leaf.shape)


def name_mismatch(header: str, missing, unexpected, *, examples: int) -> list[str]:
    """The lines of an error about tensors a file lacks or has in excess: ``header``, then a count and the
    first ``examples`` names of each kind."""
    lines = [header]
    if missing:
        lines.append(f"  {len(missing)} missing tensor(s), e.g. {', '.join(missing[:examples])}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:examples])}")
    return lines


def check_checkpoint(source: SafetensorsCheckpoint, cfg, layout: str | None = None) -> str:
    """Validate names, shapes and dtypes against ``cfg``; return the layout. Raises CheckpointError."""
    names = set(source.keys())
    layout = layout or detect_layout(names)
    maps, expected = _expected_tensors(cfg, layout)
    missing = sorted(set(expected) - names)
    unexpected = sorted(n for n in names - set(expected) if not n.endswith(_IGNORED_SUFFIXES))
    if missing or unexpected:
        lines = name_mismatch(f"checkpoint {source.location} does not match the model config ({layout} layout):",
                              missing, unexpected, examples=8)
        lines.append(
            f"  the config says {cfg.decoder.num_layers} decoder / {cfg.vision.num_layers} vision layers, "
            f"projector bias={cfg.projector.bias}, tied embeddings={cfg.decoder.tie_embeddings}"
        )
        raise CheckpointError("\n".join(lines))

    abstract = abstract_leaves(cfg)
    for name, (m, _) in expected.items():
        want = jax.eval_shape(m.to_ext, jax.ShapeDtypeStruct(_layer_shape(abstract[m.path], m), np.float32)).shape
        got = tuple(source.shape(name))
        if got != tuple(want):
            raise CheckpointError(
                f"tensor {name} in {source.location} has shape {got}, but the model config expects {tuple(want)} "
                f"(does config.json match the weights?)"
            )
        dtype = np.dtype(source.dtype(name))
        if dtype.kind not in _FLOAT_KINDS and dtype.name != "bfloat16":
            raise CheckpointError(f"tensor {name} in {source.location} has dtype {dtype.name}; weights must be floating point")
    return layout


def abstract_leaves(cfg) -> dict[str, jax.ShapeDtypeStruct]:
    """Parameter path -> ShapeDtypeStruct of a model with config ``cfg`` (no memory)."""
    out = {}
    jax.tree_util.tree_map_with_path(
        lambda p, x: out.__setitem__(param_path(p), x), nnx.state(abstract_model(cfg))
    )
    return out


def load_state(source: SafetensorsCheckpoint, cfg, *, layout: str | None = None, mesh: Mesh | None = None,
               rules=DEFAULT_RULES) -> nnx.State:
    """Parameters of a model with config ``cfg`` read from ``source``, sharded over ``mesh`` if given
    (otherwise on the default device), stored in ``cfg.param_dtype``. A config with a ``quant`` block gets
    its decoder projections (and with ``quant.embeddings`` its vocabulary tables) quantized as they are
    read (``checkpoint/quant_load.py``)."""
    plain = without_quant(cfg) if quant_enabled(cfg) else cfg  # the checkpoint holds the full-precision model
    layout = check_checkpoint(source, plain, layout)
    maps = {m.path: m for m in key_map(plain, layout)}
    abstract_state = nnx.state(abstract_model(cfg))
    shardings = state_shardings(cfg, mesh, rules)
    quantized = _quantized_leaves(source, cfg, maps, abstract_state, shardings)

    def build(keypath, leaf, sharding):
        if is_quantized_leaf(param_path(keypath)):
            return quantized.pop(param_path(keypath))
        m = maps[param_path(keypath)]

        def convert(name, index):
            # Always a private copy: jax on CPU may alias a host buffer instead of copying it, and an
            # array aliasing the file mapping would keep its pages resident for the model's lifetime.
            part = np.array(m.to_ours(source.get(name))[index], dtype=leaf.dtype, copy=True)
            source.release(name)  # consumed: unmap its pages so resident memory stays near one tensor
            return part

        def read(index):
            if not m.stacked:
                return convert(m.name, index)
            layers = range(leaf.shape[0])[index[0]]
            # Each layer is converted straight into the shard buffer: no stacking copy.
            out = None
            for j, i in enumerate(layers):
                part = convert(m.name.format(i=i), index[1:])
                if out is None:
                    out = np.empty((len(layers), *part.shape), leaf.dtype)
                out[j] = part
            return out

        # Wait for each parameter: transfers are asynchronous, and host buffers of queued transfers
        # would otherwise pile up to a second copy of the model.
        return jax.block_until_ready(jax.make_array_from_callback(leaf.shape, sharding, read))

    return jax.tree_util.tree_map_with_path(build, abstract_state, shardings)


def _quantized_leaves(source: SafetensorsCheckpoint, cfg, maps, abstract_state, shardings) -> dict:
    """Path -> array of every quantized leaf (``qkernel``, ``qscale``), each projection read layer by layer."""
    if not quant_enabled(cfg):
        return {}
    leaves = {param_path(p): (x, s) for (p, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_state),
                                                          jax.tree.leaves(shardings))}
    out = {}
    dtype = jax.numpy.dtype(cfg.param_dtype)
    for path in [p for p in leaves if p.endswith("/qkernel")]:
        owner = path.removesuffix("/qkernel")
        m = maps[full_precision_path(path)]
        (qkernel, kernel_sharding), (qscale, scale_sharding) = leaves[path], leaves[f"{owner}/qscale"]

        def read(i, m=m):  # layer i of a stacked projection; None: a vocabulary table, whole
            name = m.name if i is None else m.name.format(i=i)
            tensor = np.array(m.to_ours(source.get(name)), dtype=dtype, copy=True)
            source.release(name)
            return tensor

        out[path], out[f"{owner}/qscale"] = quantized_leaf(read, path, qkernel, qscale, kernel_sharding,
                                                           scale_sharding, cfg.quant)
    return out
