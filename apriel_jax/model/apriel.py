"""The Llava-style model: Pixtral vision encoder -> projector -> scatter into [IMG] slots -> decoder.

Calling the model on a batch (the batch contract of ARCHITECTURE.md) returns logits [B, S, vocab]. Image
features reach the decoder by a static scatter: patch p of row b lands at token ``patch_token_index[b, p]``;
padding patches carry an out-of-range index and are dropped, so any mix of image sizes has the same shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from apriel_jax.model.config import validate
from apriel_jax.model.decoder import Decoder, KVCache
from apriel_jax.model.layers import Linear, activation
from apriel_jax.model.lora import PROJECTOR_TARGETS, add_adapters, dropout_keys, enabled
from apriel_jax.model.quant import enabled as quant_enabled
from apriel_jax.model.vision import VisionEncoder


class Projector(nnx.Module):
    """linear_1 -> activation (exact GELU for Pixtral) -> linear_2."""

    def __init__(self, vision_hidden, text_hidden, cfg, *, rngs, param_dtype, dtype, lora=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=cfg.bias)
        self.linear_1 = Linear((vision_hidden, text_hidden), ("embed", "mlp"), **kw)
        self.linear_2 = Linear((text_hidden, text_hidden), ("mlp", "embed"), **kw)
        self.act_name = cfg.hidden_act
        activation(cfg.hidden_act)
        if lora is not None:
            add_adapters(self, {name: (name,) for name in PROJECTOR_TARGETS}, lora, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(activation(self.act_name)(self.linear_1(x)))


class AprielModel(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        validate(config)
        # Frozen (immutable, hashable): NNX keeps non-array attributes as static metadata that jit hashes.
        # ``model.config.as_configdict()`` gives a mutable copy.
        self.config = ml_collections.FrozenConfigDict(config)
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        common = dict(impl=config.attention_impl, remat_policy=config.remat_policy, **kw)
        lora = config.lora if enabled(config) else None  # older saved configs have no lora block
        self.vision = VisionEncoder(config.vision, feature_layer=config.projector.vision_feature_layer, **common)
        self.projector = Projector(config.vision.hidden_size, config.decoder.hidden_size, config.projector,
                                   lora=lora, **kw)
        # remat_group: older saved configs lack the key (one layer per remat group).
        quant = config.quant if quant_enabled(config) else None  # a quantized frozen base (model/quant.py)
        self.decoder = Decoder(config.decoder, remat_group=config.get("remat_group", 1), lora=lora, quant=quant,
                               **common)

    def image_features(self, patches, patch_positions, patch_segment_ids, dropout_key=None):
        """Projected vision features [B, P, text_hidden] for the batch's patches."""
        features = self.vision(patches, patch_positions, patch_segment_ids)
        with dropout_keys(self.projector, dropout_key):
            return self.projector(features)

    def embed_inputs(self, tokens, patches=None, patch_positions=None, patch_segment_ids=None,
                     patch_token_index=None, dropout_key=None):
        """Token embeddings with image features written into their [IMG] slots."""
        x = self.decoder.embed_tokens(tokens)
        if patches is None:
            return x
        features = self.image_features(patches, patch_positions, patch_segment_ids, dropout_key).astype(x.dtype)
        rows = jnp.arange(tokens.shape[0])[:, None]
        return x.at[rows, patch_token_index].set(features, mode="drop")

    def hidden_states(self, batch: dict, kv_cache: KVCache | None = None, dropout_key=None):
        """Final-norm hidden states [B, S, E] (and the updated cache) for a batch-contract dict.

        ``dropout_key``: a training step's key for the LoRA adapters' dropout (None: no dropout)."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        x = self.embed_inputs(
            batch["tokens"], batch.get("patches"), batch.get("patch_positions"),
            batch.get("patch_segment_ids"), batch.get("patch_token_index"), keys[0],
        )
        return self.decoder(x, batch["positions"], batch["segment_ids"], kv_cache, dropout_key=keys[1])

    def __call__(self, batch: dict, kv_cache: KVCache | None = None):
        """Logits [B, S, vocab] in fp32; with a cache, returns (logits, new_cache)."""
        hidden, new_cache = self.hidden_states(batch, kv_cache)
        logits = self.decoder.logits(hidden)
        return logits if kv_cache is None else (logits, new_cache)

