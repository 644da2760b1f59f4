"""Cross-entropy over a huge vocabulary without ever materialising [B, S, V] logits.

With V = 131,072 a single 8k-token row of fp32 logits is 4 GiB, and the backward pass would keep it
alive. Instead the sequence is cut into chunks; each chunk's logits are computed, reduced to per-token
losses and discarded. The chunk body runs under ``jax.checkpoint``, so the backward pass recomputes a
chunk's logits from its (small) hidden slice instead of storing every chunk's logits.

The function returns *sums*, not means: the training step divides by the number of counted tokens over
the whole global batch (all packed documents and all gradient-accumulation micro-batches), which makes
accumulating N micro-batches exactly equal to one N-times-larger batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apriel_jax.parallel.rules import ACTIVATION_AXES, constrain


def _chunk_losses(h, kernel, targets, mask, compute_dtype):
    """Per-chunk sums: (token loss, z-loss term). h [B, C, E], targets/mask [B, C]."""
    h = constrain(h, ACTIVATION_AXES)
    logits = jnp.einsum(
        "bce,ev->bcv", h.astype(compute_dtype), kernel.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )
    # Rows stay on their batch shards and the vocabulary on the tensor axis: without this hint XLA may
    # gather a whole-batch chunk of logits onto every device.
    logits = constrain(logits, ("batch", None, "vocab"))
    lse = jax.nn.logsumexp(logits, axis=-1)
    # One-hot contraction instead of a gather: it stays local when the vocabulary axis is sharded.
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jnp.sum((lse - target_logit) * mask), jnp.sum(jnp.square(lse) * mask)


def chunked_cross_entropy(hidden, lm_kernel, targets, loss_mask, *, chunk_size: int,
                          z_loss_weight: float = 0.0, compute_dtype=jnp.float32):
    """Summed next-token cross-entropy of ``hidden`` [B, S, E] projected by ``lm_kernel`` [E, V].

    Returns ``(loss_sum, token_count, z_loss_sum)``, all fp32 scalars: ``loss_sum`` is the sum of
    ``-log p(target)`` over tokens where ``loss_mask`` is non-zero (weighted by it), ``token_count`` is
    ``sum(loss_mask)`` and ``z_loss_sum`` is ``z_loss_weight * sum(mask * logsumexp(logits)^2)``
    (PaLM-style auxiliary loss keeping the softmax normaliser near 1; zero when the weight is zero).
    S need not be a multiple of ``chunk_size``: the tail is padded with masked-out positions.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, s, e = hidden.shape
    chunk = min(chunk_size, s)
    pad = -s % chunk
    mask = loss_mask.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (s + pad) // chunk
    # Chunks become the leading (scanned) axis; the batch axis, and so its sharding, is untouched.
    hs = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ms = mask.reshape(b, n, chunk).swapaxes(0, 1)

    body = jax.checkpoint(lambda h, t, m: _chunk_losses(h, lm_kernel, t, m, compute_dtype), prevent_cse=False)

    def step(carry, xs):
        loss, z = body(*xs)
        return (carry[0] + loss, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, z_sum), _ = jax.lax.scan(step, (zero, zero), (hs, ts, ms))
    return loss_sum, jnp.sum(mask), z_loss_weight * z_sum
