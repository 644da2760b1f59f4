"""``cudnn`` attention: cuDNN's fused flash attention through ``jax.nn.dot_product_attention``.

jax 0.10's public API has no segment-id arguments (only per-row lengths, i.e. one document per row), so
packed segments are passed as a boolean ``mask`` [B, 1, S, S], which jax turns into an additive bias for
cuDNN. That costs O(S^2) memory per row (what our own Pallas kernel avoids) but keeps this a faithful
baseline. Causality uses cuDNN's own causal mask type, which skips the masked half.

Refused (ValueError): non-GPU backends, dtypes other than bf16/fp16, head_dim > 128 or not a multiple
of 8, odd sequence lengths (cuDNN's bias path in training), sliding windows combined with segments,
and KV-cache decoding (the entry point routes decoding to ``xla``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apriel_jax.kernels.attention import register


def unsupported_reason(q: jax.Array, k: jax.Array) -> str | None:
    """Why cuDNN cannot run this call, or None when it can."""
    if jax.default_backend() != "gpu":
        return f"cudnn attention needs a CUDA GPU (backend is {jax.default_backend()!r})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cudnn flash attention needs bf16 or fp16 inputs, got {q.dtype}"
    d = q.shape[-1]
    if d > 128 or d % 8:
        return f"cudnn flash attention needs head_dim <= 128 and a multiple of 8, got {d}"
    if q.shape[1] % 2 or k.shape[1] % 2:
        return f"cudnn attention with a mask needs even sequence lengths, got {q.shape[1]} and {k.shape[1]}"
    if q.shape[1] != k.shape[1]:
        return "cudnn attention here is for training (Sq == Sk)"
    return None


def cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
    return unsupported_reason(q, k) is None


@register("cudnn")
def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, q_offset, sliding_window, scale):
    reason = unsupported_reason(q, k)
    if reason is None and sliding_window:
        reason = "cudnn attention with segment ids does not support sliding_window here"
    if reason is None and not (isinstance(q_offset, int) and q_offset == 0):
        reason = "cudnn attention does not support q_offset (KV-cache decoding uses impl='xla')"
    if reason:
        raise ValueError(reason)
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # [B, 1, Sq, Sk]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                        implementation="cudnn")
