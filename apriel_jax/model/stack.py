"""Stacked layers: created with ``nnx.vmap`` (one parameter array per weight, leading ``layers`` axis)
and applied with ``jax.lax.scan`` under a named remat policy.

Why stacked: compile time does not grow with depth (48 layers compile like one), and depth upscaling is
an index along the ``layers`` axis. Why ``lax.scan`` over the split state instead of ``nnx.scan``: the
layers hold only parameters (nothing is mutated in the forward pass), so a pure scan over the state is
simpler, and the remat policy wraps exactly the per-layer function.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from apriel_jax.kernels.attention import SAVEABLE_RESIDUALS
from apriel_jax.parallel.rules import constrain

_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # full, except the attention output and log-sum-exp the kernel names (xla_blocked, the CPU path):
    # the S x S forward is not recomputed, for B*S*(H*D + H) saved values per layer
    "attention": jax.checkpoint_policies.save_only_these_names(*SAVEABLE_RESIDUALS),
}


def make_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Build ``num_layers`` independent layers as one module whose parameters have a leading layer axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(layer_rngs):
        return make_layer(layer_rngs)

    return build(rngs)


def scan_stack(
    stack: nnx.Module,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    remat_policy: str = "none",
    num_layers: int | None = None,
    remat_group: int = 1,
):
    """Run ``body(layer, carry, x) -> (carry, y)`` over the first ``num_layers`` layers of ``stack``.

    ``remat_group`` > 1 (with a remat policy) nests the remat: an outer scan over groups of that many
    layers saves only each group's input, and the backward pass of a group recomputes its layers (each
    itself rematerialised). Saved residual streams drop from L to L/k + k, for one more forward pass per
    layer: what long rows on small-HBM chips need (e.g. 16k tokens per v5e chip at 15B).
    """
    graphdef, state = nnx.split(stack)
    # Logical axes of one layer's parameters (the stacked arrays' axes minus the leading "layers").
    layer_axes = jax.tree.map(lambda spec: tuple(spec)[1:], nnx.get_partition_spec(state),
                              is_leaf=lambda x: isinstance(x, PartitionSpec))
    if num_layers is not None:
        state = jax.tree.map(lambda a: a[:num_layers], state)

    def step(carry, layer_and_x):
        layer_state, x = layer_and_x
        # Sharding hints inside the loop: each layer's parameters stay sharded (FSDP gathers them per
        # layer) and so do their gradients, which XLA otherwise accumulates replicated across the scan.
        layer_state = jax.tree.map(constrain, layer_state, layer_axes,
                                   is_leaf=lambda x: isinstance(x, tuple))
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if remat_policy != "none":
        step = jax.checkpoint(step, policy=_POLICIES[remat_policy], prevent_cse=False)
    layers = jax.tree.leaves(state)[0].shape[0]
    if remat_group <= 1 or remat_policy == "none":
        return jax.lax.scan(step, carry, (state, xs))
    if layers % remat_group:
        raise ValueError(f"remat_group={remat_group} must divide the number of layers ({layers})")

    def group(a):
        return a.reshape((layers // remat_group, remat_group) + a.shape[1:])

    def group_step(carry, group_and_x):
        return jax.lax.scan(step, carry, group_and_x)

    group_step = jax.checkpoint(group_step, policy=None, prevent_cse=False)  # save only the group's input
    carry, ys = jax.lax.scan(group_step, carry, jax.tree.map(group, (state, xs)))
    return carry, jax.tree.map(lambda y: y.reshape((layers,) + y.shape[2:]), ys)
