"""Compile the real training step for a TPU topology without a TPU (see ``parallel/aot.py``).

Everything is abstract: parameters, optimizer state and the batch are ShapeDtypeStructs sharded over a
mesh of described TPU devices, so a 15B configuration is checked for fit and sharding on a CPU host.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from apriel_jax.model import abstract_model
from apriel_jax.parallel.aot import CompileReport, report, topology_mesh
from apriel_jax.parallel.rules import logical_to_spec
from apriel_jax.train.flops import train_step_flops
from apriel_jax.train.optimizer import Optimizer, split_trainable
from apriel_jax.train.step import TrainState, make_train_step


def abstract_train_state(cfg, optimizer: Optimizer, step, trainable=("all",)) -> TrainState:
    shardings = step.shardings
    params, frozen = split_trainable(nnx.state(abstract_model(cfg)), trainable)
    opt_state = jax.eval_shape(optimizer.init, params)

    def place(tree, tree_shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, tree_shardings)

    return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step), place(params, shardings.params),
                      place(frozen, shardings.frozen), place(opt_state, shardings.opt_state))


def abstract_batch(mesh, batch: int, seq: int, patches: int, patch_dim: int = 768) -> dict:
    """The batch contract as ShapeDtypeStructs, rows sharded like the train step expects."""
    sharding = NamedSharding(mesh, logical_to_spec(("batch",), mesh))

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    text = dict(
        tokens=spec((batch, seq), jnp.int32), targets=spec((batch, seq), jnp.int32),
        loss_mask=spec((batch, seq), jnp.float32), segment_ids=spec((batch, seq), jnp.int32),
        positions=spec((batch, seq), jnp.int32),
    )
    if not patches:  # text-only stages feed no patch fields, so the vision tower does not run
        return text
    return dict(
        text, patches=spec((batch, patches, patch_dim), jnp.float32),
        patch_positions=spec((batch, patches, 2), jnp.int32), patch_segment_ids=spec((batch, patches), jnp.int32),
        patch_token_index=spec((batch, patches), jnp.int32),
    )


def compile_train_step(cfg, optimizer: Optimizer, topology: str, degrees: dict, *, batch: int, seq: int,
                       patches: int, trainable=("all",), grad_accum_steps: int = 1, chunk_size: int = 2048,
                       num_slices: int = 1, dcn_degrees: dict | None = None,
                       lm_head_grad_dtype: str | None = None) -> tuple[CompileReport, float]:
    """(compile report, model FLOPs per chip per step) for one training configuration on a TPU topology."""
    mesh = topology_mesh(topology, degrees, num_slices=num_slices, dcn_degrees=dcn_degrees)
    step = make_train_step(cfg, nnx.graphdef(abstract_model(cfg)), optimizer, mesh, trainable=trainable,
                           grad_accum_steps=grad_accum_steps, chunk_size=chunk_size,
                           lm_head_grad_dtype=lm_head_grad_dtype)
    state = abstract_train_state(cfg, optimizer, step, trainable)
    inputs = abstract_batch(mesh, batch, seq, patches, cfg.vision.patch_size ** 2 * cfg.vision.num_channels)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.jitted.trace(state, inputs).lower(lowering_platforms=("tpu",)).compile()
    result = report(compiled, topology, mesh.devices.size, time.perf_counter() - start)
    result.mesh_shape = dict(mesh.shape)
    images = [256] * (batch * patches // 256)  # images of 256 patches fill each row's patch budget
    flops = train_step_flops(cfg, batch=batch, seq_len=seq, image_patch_counts=images) / mesh.devices.size
    return result, flops
