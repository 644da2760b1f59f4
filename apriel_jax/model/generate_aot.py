"""Compile KV-cached generation for a TPU topology without a TPU (see ``parallel/aot.py``).

The compiled program is the one ``generate`` runs: one prefill of the prompt (text and image patches), then a
``while_loop`` of single-token decode steps over a KV cache of prompt length + ``new_tokens`` positions.
Parameters and the prompt are ShapeDtypeStructs placed on a mesh of described TPU devices, so the fit of
e.g. the 15B model with an int8 base on one v6e chip is checked from a CPU host.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from apriel_jax.model.factory import abstract_model, state_shardings
from apriel_jax.model.generate import SamplingConfig, generate_program
from apriel_jax.parallel.aot import CompileReport, report, topology_mesh
from apriel_jax.parallel.rules import logical_to_spec


def abstract_prompt(mesh, cfg, batch: int, prompt_len: int, patches: int) -> dict:
    """A prompt batch (the batch contract without labels) as ShapeDtypeStructs, rows on the batch axes."""
    sharding = NamedSharding(mesh, logical_to_spec(("batch",), mesh))

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    prompt = dict(tokens=spec((batch, prompt_len), jnp.int32), positions=spec((batch, prompt_len), jnp.int32),
                  segment_ids=spec((batch, prompt_len), jnp.int32))
    if patches:
        patch_dim = cfg.vision.patch_size ** 2 * cfg.vision.num_channels
        prompt.update(patches=spec((batch, patches, patch_dim), jnp.float32),
                      patch_positions=spec((batch, patches, 2), jnp.int32),
                      patch_segment_ids=spec((batch, patches), jnp.int32),
                      patch_token_index=spec((batch, patches), jnp.int32))
    return prompt


def compile_generate(cfg, topology: str, degrees: dict, *, batch: int, prompt_len: int, new_tokens: int,
                     patches: int = 0) -> CompileReport:
    """The compile report of generating ``new_tokens`` tokens after a ``prompt_len``-token prompt (with
    ``patches`` image patches) for ``batch`` rows, the parameters in the dtypes ``cfg`` stores them in."""
    mesh = topology_mesh(topology, degrees)
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(cfg, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    prompt = abstract_prompt(mesh, cfg, batch, prompt_len, patches)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = generate_program.trace(graphdef, state, prompt, rng, sampling).lower(
            lowering_platforms=("tpu",))
        compiled = lowered.compile()
    result = report(compiled, topology, mesh.devices.size, time.perf_counter() - start)
    result.mesh_shape = dict(mesh.shape)
    return result
