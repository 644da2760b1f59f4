"""Depth upscaling of the decoder: a new layer stack built from the old one by a layer map.

The decoder's layers are one stacked array per weight with a leading ``layers`` axis, so upscaling is a
gather along that axis: ``new[i] = old[layer_map[i]]``. The layer axis is never sharded, so the gather
runs shard-locally on sharded parameters and no host ever holds the model.

Apriel-1.5 grew Pixtral's 40 decoder layers to 48 by duplicating intermediate layers (the paper does not
publish which); :func:`default_layer_map` duplicates the middle ones, each copy right after its source.
With ``identity_init`` the copies start as identity blocks: their attention output and MLP down
projections are zeroed, so each copy adds nothing to the residual stream and the upscaled model computes
exactly what the source model did (tested); training then grows them from there.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

# Parameters whose zeroing makes a pre-norm residual block an identity map.
_OUTPUT_PROJECTIONS = (("attn", "o", "kernel"), ("mlp", "down", "kernel"))


def default_layer_map(source_layers: int, target_layers: int) -> list[int]:
    """Keep every source layer once and duplicate the ``target - source`` middle ones in place."""
    extra = target_layers - source_layers
    if extra < 0 or extra > source_layers:
        raise ValueError(f"cannot grow {source_layers} layers to {target_layers} by duplicating layers")
    first = (source_layers - extra) // 2
    duplicated = set(range(first, first + extra))
    layer_map = []
    for i in range(source_layers):
        layer_map += [i, i] if i in duplicated else [i]
    return layer_map


def check_layer_map(layer_map: Sequence[int], source_layers: int) -> None:
    bad = [i for i in layer_map if not 0 <= i < source_layers]
    if bad or not layer_map:
        raise ValueError(f"layer_map must be a non-empty list of indices in [0, {source_layers}), got bad {bad}")


def upscale_decoder(state: nnx.State, cfg, layer_map: Sequence[int], *, identity_init: bool = True):
    """(new model config, new parameter state) with the decoder stack rebuilt by ``layer_map``.

    ``state`` is the model's parameter state (possibly sharded); the result keeps each array's sharding.
    A layer that repeats an index already used earlier in the map is a copy; with ``identity_init`` its
    output projections are zeroed.
    """
    source_layers = cfg.decoder.num_layers
    check_layer_map(layer_map, source_layers)
    index = jnp.asarray(layer_map, jnp.int32)
    copies = jnp.asarray([i in layer_map[:k] for k, i in enumerate(layer_map)], bool)

    def rebuild(path, array):
        names = tuple(getattr(p, "key", getattr(p, "name", None)) for p in path)
        if names[:2] != ("decoder", "layers"):
            return array
        grown = jnp.take(array, index, axis=0)
        if identity_init and any(names[2:5] == out for out in _OUTPUT_PROJECTIONS):
            keep = (~copies).reshape((-1,) + (1,) * (array.ndim - 1))
            grown = jnp.where(keep, grown, jnp.zeros_like(grown))
        return grown

    sharding = jax.tree.map(lambda a: getattr(a, "sharding", None), state)
    new_state = jax.jit(lambda s: jax.tree_util.tree_map_with_path(rebuild, s), out_shardings=sharding)(state)
    new_cfg = ml_collections.ConfigDict(cfg.to_dict())  # also turns a model's frozen config into a copy
    new_cfg.decoder.num_layers = len(layer_map)
    return new_cfg, new_state
