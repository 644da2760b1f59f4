"""Autoregressive generation with a KV cache: one prefill (text and images), then one token per step.

Shapes are static: the cache holds prompt length + ``max_new_tokens`` positions, the decode loop is a
``lax.while_loop`` that stops early once every row has produced a stop token. Prompts may be left- or
right-padded (padding has segment id 0 and is masked out of attention); each row continues from its
own last real token and position.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from apriel_jax.data.batch_check import check_batch_in_debug
from apriel_jax.model.decoder import KVCache


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_p < 1 is nucleus sampling; top_k > 0 keeps the k most likely tokens."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


def sample_token(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token per row from logits [B, V]."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_index = jnp.sum(mass_before < cfg.top_p, axis=-1, keepdims=True) - 1
        threshold = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def generate_program(graphdef, state, batch, rng, cfg: SamplingConfig):
    """The jitted prefill + decode loop (``generate`` calls it; ``generate_aot`` compiles it for a TPU)."""
    model = nnx.merge(graphdef, state)
    tokens = batch["tokens"]
    b, s = tokens.shape
    dcfg = model.config.decoder
    cache = KVCache.empty(dcfg, b, s + cfg.max_new_tokens, jnp.dtype(model.config.dtype))
    logits, cache = model(batch, cache)

    real = batch["segment_ids"] != 0
    # Index of each row's last real token (works for left and right padding).
    last = s - 1 - jnp.argmax(real[:, ::-1], axis=-1)
    rows = jnp.arange(b)
    last_logits = logits[rows, last]
    next_position = batch["positions"][rows, last] + 1
    stop = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < cfg.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, last_logits, out, done, position, rng = carry
        rng, step_rng = jax.random.split(rng)
        token = jnp.where(done, cfg.pad_id, sample_token(last_logits, step_rng, cfg))
        out = out.at[:, i].set(token)
        done = done | jnp.isin(token, stop)
        step = {
            "tokens": token[:, None],
            "positions": position[:, None],
            "segment_ids": jnp.ones((b, 1), jnp.int32),
        }
        logits, cache = model(step, cache)
        return i + 1, cache, logits[:, 0], out, done, position + 1, rng

    out = jnp.full((b, cfg.max_new_tokens), cfg.pad_id, jnp.int32)
    carry = (jnp.int32(0), cache, last_logits, out, jnp.zeros((b,), bool), next_position, rng)
    steps, _, _, out, done, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, done


def generate(model, batch: dict, cfg: SamplingConfig = SamplingConfig(), *, rng: jax.Array | None = None):
    """Generate up to ``cfg.max_new_tokens`` tokens after each row's prompt.

    ``batch`` follows the batch contract (``tokens``, ``positions``, ``segment_ids`` and optionally the
    ``patch*`` fields; ``targets``/``loss_mask`` are ignored). Each row must hold one prompt (segment
    ids 0 or 1). Under ``APRIEL_DEBUG`` the batch is checked against the contract first. Returns
    (tokens [B, max_new_tokens] with ``pad_id`` after a row's stop token, finished [B] bool).
    """
    check_batch_in_debug(batch, labels=False)
    graphdef, state = nnx.split(model)
    keep = ("tokens", "positions", "segment_ids", "patches", "patch_positions", "patch_segment_ids",
            "patch_token_index")
    inputs = {k: jnp.asarray(v) for k, v in batch.items() if k in keep}
    if inputs.get("patches") is not None and inputs["patches"].shape[1] == 0:
        inputs = {k: v for k, v in inputs.items() if not k.startswith("patch")}
    rng = jax.random.key(0) if rng is None else rng
    return generate_program(graphdef, state, inputs, rng, cfg)
