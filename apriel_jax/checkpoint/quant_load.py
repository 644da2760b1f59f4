"""Quantize the frozen base of a full-precision checkpoint while it is read (``model/quant.py``).

A stacked projection ([layers, *in, *out]) is built one layer at a time: the layer's tensor is read on the
host, placed on the devices with the layer's sharding, quantized there and written into the stacked
quantized arrays (donated, so they are updated in place). A vocabulary table (``quant.embeddings``) is
read whole, placed sharded and quantized there. Host memory holds one layer's tensor (an HF
checkpoint) or one stacked parameter (an orbax one, which restores a parameter whole); device memory
never holds more than the quantized model plus one full-precision layer. Quantizing on the devices is the
same ``quantize`` function the model uses, so a checkpoint quantized at load equals the model built from
the same weights.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from apriel_jax.model.quant import full_precision_path, is_quantized_leaf, is_stacked, kernel_in_axes, quantize, \
    quantizer, without_quant


def _layer_sharding(sharding, mode: str, in_axes: int):
    """The sharding of one full-precision layer of a stacked projection whose quantized values are sharded
    like ``sharding``: the leading ``layers`` axis dropped and, for int4 (values stored grouped), the groups
    axis too (``model/quant.py``: ``values_axes``)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec)[1:]
    if mode == "int4" and len(spec) >= in_axes:
        del spec[in_axes - 1]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


@functools.partial(jax.jit, donate_argnums=(0, 1),
                   static_argnames=("mode", "in_axes", "group_size", "kernel_sharding", "scale_sharding"))
def _put_layer(values, scales, w, i, *, mode, in_axes, group_size, kernel_sharding, scale_sharding):
    """Quantize one layer ``w`` into row ``i`` of the stacked (donated) values and scales. Module level, so a
    checkpoint's projections of one shape share one compiled program."""
    q, s = quantize(w, in_axes, mode, group_size)
    values = jax.lax.with_sharding_constraint(values.at[i].set(q), kernel_sharding)
    return values, jax.lax.with_sharding_constraint(scales.at[i].set(s.astype(scales.dtype)), scale_sharding)


def _quantized_stack(read_layer: Callable[[int], np.ndarray], qkernel: jax.ShapeDtypeStruct,
                     qscale: jax.ShapeDtypeStruct, kernel_sharding, scale_sharding, *, mode: str, in_axes: int,
                     group_size: int) -> tuple[jax.Array, jax.Array]:
    """(values, scales) of a stacked projection whose layer ``i`` (full precision, our layout) is
    ``read_layer(i)``, sharded like the abstract ``qkernel`` / ``qscale`` say."""
    values = jnp.zeros(qkernel.shape, qkernel.dtype, device=kernel_sharding)
    scales = jnp.zeros(qscale.shape, qscale.dtype, device=scale_sharding)
    layer_sharding = _layer_sharding(kernel_sharding, mode, in_axes)
    for i in range(qkernel.shape[0]):
        host = read_layer(i)
        w = jax.make_array_from_callback(host.shape, layer_sharding, lambda index, host=host: host[index])
        # One layer in flight: wait before the next one is read, so host buffers never pile up.
        values, scales = jax.block_until_ready(_put_layer(
            values, scales, w, jnp.int32(i), mode=mode, in_axes=in_axes, group_size=group_size,
            kernel_sharding=kernel_sharding, scale_sharding=scale_sharding))
    return values, scales


def _quantized_whole(host: np.ndarray, quantized_path: str, quant, kernel_sharding,
                     scale_sharding) -> tuple[jax.Array, jax.Array]:
    """(values, scales) of an unstacked weight (a vocabulary table, full precision, our layout) ``host``,
    placed like its quantized values and quantized on the devices."""
    w = jax.make_array_from_callback(host.shape, kernel_sharding, lambda index: host[index])
    fn = jax.jit(quantizer(quantized_path, quant), out_shardings=(kernel_sharding, scale_sharding))
    return jax.block_until_ready(fn(w))


def quantized_leaf(read: Callable[[int | None], np.ndarray], quantized_path: str, qkernel: jax.ShapeDtypeStruct,
                   qscale: jax.ShapeDtypeStruct, kernel_sharding, scale_sharding, quant) -> tuple[jax.Array, jax.Array]:
    """(values, scales) of the quantized weight at ``quantized_path`` (a ``.../qkernel``), read in our layout
    at full precision by ``read``: a stacked projection layer by layer (``read(i)``), a vocabulary table
    (``quant.embeddings``) whole (``read(None)``). Both checkpoint loaders call this."""
    if is_stacked(quantized_path):
        return _quantized_stack(read, qkernel, qscale, kernel_sharding, scale_sharding, mode=quant.mode,
                                in_axes=kernel_in_axes(quantized_path), group_size=quant.group_size)
    return _quantized_whole(read(None), quantized_path, quant, kernel_sharding, scale_sharding)


def _nested(flat: dict[str, object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def load_orbax_quantized(path, cfg, *, mesh=None, rules=None) -> nnx.State:
    """The state of a model with the quantized config ``cfg`` from an apriel-jax model directory that holds
    the full-precision model: every other parameter is restored straight onto its shards, each projection
    is restored whole to host memory (one at a time) and quantized layer by layer onto the devices (a
    vocabulary table whole)."""
    from apriel_jax.checkpoint import orbax_io
    from apriel_jax.model.factory import abstract_model, param_path, state_shardings
    from apriel_jax.parallel.rules import DEFAULT_RULES

    rules = rules or DEFAULT_RULES
    abstract_state = nnx.state(abstract_model(cfg))
    flat = {param_path(p): (x, s) for (p, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_state),
                                                        jax.tree.leaves(state_shardings(cfg, mesh, rules)))}
    plain = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for p, (x, s) in flat.items()
             if not is_quantized_leaf(p)}
    values = _flat(orbax_io.restore_pure(path, _nested(plain)))
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    full_shapes = {param_path(p): x.shape for p, x in  # int4 values are stored grouped: not the kernel's shape
                   jax.tree_util.tree_leaves_with_path(nnx.state(abstract_model(without_quant(cfg))))}
    for qpath in [p for p in flat if p.endswith("/qkernel")]:
        owner, source = qpath.removesuffix("/qkernel"), full_precision_path(qpath)
        (qkernel, kernel_sharding), (qscale, scale_sharding) = flat[qpath], flat[f"{owner}/qscale"]
        stored = jax.ShapeDtypeStruct(full_shapes[source], jnp.dtype(cfg.param_dtype), sharding=host)
        whole = np.asarray(_flat(orbax_io.restore_pure(path, _nested({source: stored})))[source])
        values[qpath], values[f"{owner}/qscale"] = quantized_leaf(
            lambda i, whole=whole: whole if i is None else whole[i], qpath, qkernel, qscale, kernel_sharding,
            scale_sharding, cfg.quant)
        del whole
    return jax.tree_util.tree_map_with_path(lambda p, _: values[param_path(p)], abstract_state)


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + "/") if isinstance(value, dict) else {name: value})
    return out
