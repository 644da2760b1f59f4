"""Mistral-NeMo style decoder: token embedding, stacked pre-norm layers (GQA attention, SiLU-gated MLP),
final RMSNorm and an untied LM head. With a ``lora`` config the layers' projections carry adapters
(``model/lora.py``); with a ``quant`` config they are stored quantized (``model/quant.py``), and with
``quant.embeddings`` the token table and the LM head too."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from apriel_jax.model.attention import SelfAttention
from apriel_jax.model.layers import GatedMLP, Linear, RMSNorm, logical_param, normal_init
from apriel_jax.model.lora import DECODER_TARGETS, add_adapters, dropout_keys
from apriel_jax.model.quant import Int8Head, QuantizedEmbedding, QuantizedLinear, quantize_embeddings, \
    quantize_projections
from apriel_jax.model.rope import text_angles
from apriel_jax.model.stack import make_stack, scan_stack
from apriel_jax.parallel.rules import ACTIVATION_AXES, constrain


class KVCache(NamedTuple):
    """Decoder KV cache. k, v: [layers, B, T, Hkv, D]; segment_ids: [B, T] (0 = empty or padding);
    index: number of positions already written (scalar int32)."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
            jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32),
        )


class DecoderLayer(nnx.Module):
    def __init__(self, cfg, *, impl, rngs, param_dtype, dtype, lora=None, quant=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.attn = SelfAttention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, causal=True, impl=impl,
            sliding_window=cfg.get("sliding_window", 0), **kw
        )
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, **kw)
        quantize_projections(self, quant)  # a quantized base (model/quant.py) first, adapters on top of it
        if lora is not None:
            add_adapters(self, DECODER_TARGETS, lora, rngs=rngs)

    def __call__(self, x, angles, segment_ids, kv_cache=None, dropout_key=None):
        x = constrain(x, ACTIVATION_AXES)
        with dropout_keys(self, dropout_key):
            attn_out, new_kv = self.attn(self.input_norm(x), angles, segment_ids, kv_cache)
            x = x + attn_out
            x = x + self.mlp(self.post_attn_norm(x))
        return constrain(x, ACTIVATION_AXES), new_kv


class Decoder(nnx.Module):
    def __init__(self, cfg, *, impl="xla", remat_policy="none", remat_group=1, lora=None, quant=None,
                 rngs: nnx.Rngs, param_dtype, dtype):
        # Plain scalars only: module attributes become static graph metadata, which must be hashable.
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.dtype = dtype
        self.remat_policy, self.remat_group = remat_policy, int(remat_group)
        self.num_layers = cfg.num_layers
        self.embed = logical_param(
            normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype), ("vocab", "embed")
        )
        self.layers = make_stack(
            lambda r: DecoderLayer(cfg, impl=impl, rngs=r, param_dtype=param_dtype, dtype=dtype, lora=lora,
                                   quant=quant),
            cfg.num_layers,
            rngs,
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), rngs=rngs,
                        param_dtype=param_dtype, dtype=dtype)
        )
        quantize_embeddings(self, quant)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        if isinstance(self.embed, QuantizedEmbedding):
            return self.embed(tokens, self.dtype)
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

    def head(self) -> jax.Array | Int8Head:
        """The [E, V] output projection (the transposed embedding when tied), or its int8 form."""
        if self.lm_head is None:
            return self.embed.as_head() if isinstance(self.embed, QuantizedEmbedding) else self.embed[...].T
        if isinstance(self.lm_head, QuantizedLinear):
            return Int8Head(self.lm_head.qkernel[...], self.lm_head.qscale[...])
        return self.lm_head.kernel[...]

    def __call__(self, x, positions, segment_ids, kv_cache: KVCache | None = None, dropout_key=None):
        """Run the layers and the final norm on embeddings x [B, S, E]. Returns (hidden, new cache).

        ``dropout_key`` (training only, not with a cache) turns on the adapters' dropout: one key per layer.
        """
        angles = text_angles(positions, self.head_dim, self.rope_theta)
        if kv_cache is None:
            def body(layer, h, key):
                h, _ = layer(h, angles, segment_ids, dropout_key=key)
                return h, None

            keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)
            x, _ = scan_stack(self.layers, body, x, keys, remat_policy=self.remat_policy,
                              remat_group=self.remat_group)
            return self.norm(x), None

        cache_segments = jax.lax.dynamic_update_slice(kv_cache.segment_ids, segment_ids, (0, kv_cache.index))

        def body(layer, h, kv):
            h, new_kv = layer(h, angles, segment_ids, (kv[0], kv[1], cache_segments, kv_cache.index))
            return h, new_kv

        x, (k, v) = scan_stack(self.layers, body, x, (kv_cache.k, kv_cache.v))
        new_cache = KVCache(k, v, cache_segments, kv_cache.index + x.shape[1])
        return self.norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Project hidden states to vocabulary logits (fp32). Training uses a chunked loss instead."""
        head = self.head()
        if isinstance(head, Int8Head):
            return head.logits(hidden, self.dtype)
        if self.lm_head is None:
            return jnp.dot(hidden, head.astype(self.dtype), preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)
