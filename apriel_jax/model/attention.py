"""Multi-head self-attention with rotary embeddings, shared by the vision encoder and the decoder.

The projections keep heads as their own kernel axis ([embed, heads, head_dim]) so tensor parallelism
shards heads exactly. The score computation is delegated to ``kernels.attention`` (segment ids, no
dense mask). With a KV cache the new keys/values are written at ``cache_index`` and queries attend to
the whole cache, restricted by the cache's segment ids and causality.
"""

from __future__ import annotations

import jax
from flax import nnx

from apriel_jax.kernels.attention import attention
from apriel_jax.model.layers import Linear
from apriel_jax.model.rope import apply_rotary


class SelfAttention(nnx.Module):
    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        causal: bool,
        impl: str,
        sliding_window: int = 0,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
    ):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.q = Linear((hidden, num_heads, head_dim), ("embed", "heads", "head_dim"), **kw)
        self.k = Linear((hidden, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), **kw)
        self.v = Linear((hidden, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), **kw)
        self.o = Linear((num_heads, head_dim, hidden), ("heads", "head_dim", "embed"), in_axes=2, **kw)
        self.causal = causal
        self.impl = impl
        self.sliding_window = sliding_window

    def __call__(self, x, angles, segment_ids, kv_cache=None):
        """x [B, S, E], angles [B, S, D/2], segment_ids [B, S].

        ``kv_cache`` is None or a tuple (k [B, T, Hkv, D], v [B, T, Hkv, D], cache_segment_ids [B, T],
        cache_index scalar) where cache_segment_ids already includes this call's tokens. Returns
        (output [B, S, E], updated (k, v) or None).
        """
        q = apply_rotary(self.q(x), angles)
        k = apply_rotary(self.k(x), angles)
        v = self.v(x)
        if kv_cache is None:
            out = attention(q, k, v, segment_ids, segment_ids, causal=self.causal, impl=self.impl,
                            sliding_window=self.sliding_window)
            return self.o(out), None
        cache_k, cache_v, cache_segments, index = kv_cache
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
        # The cache is always decoded with the XLA path: one query row against a long cache is a
        # matrix-vector product that fused training kernels do not target.
        out = attention(
            q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), segment_ids, cache_segments,
            causal=True, impl="xla", q_offset=index, sliding_window=self.sliding_window,
        )
        return self.o(out), (cache_k, cache_v)
