"""Cross-entropy over a huge vocabulary without ever materialising [B, S, V] logits.

With V = 131,072 a single 8k-token row of fp32 logits is 4 GiB, and the backward pass would keep it
alive. Instead the sequence is cut into chunks; each chunk's logits are computed, reduced to per-token
losses and discarded. The backward pass is written by hand (a custom VJP): it recomputes a chunk's
logits from its (small) hidden slice and forms d(logits) = softmax - onehot directly, so neither pass
ever holds more than one chunk of logits.

The function returns *sums*, not means: the training step divides by the number of counted tokens over
the whole global batch (all packed documents and all gradient-accumulation micro-batches), which makes
accumulating N micro-batches exactly equal to one N-times-larger batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from apriel_jax.parallel.rules import ACTIVATION_AXES, constrain


def _logits(h, kernel, compute_dtype):
    h = constrain(h, ACTIVATION_AXES)
    logits = jnp.einsum("bce,ev->bcv", h.astype(compute_dtype), kernel.astype(compute_dtype),
                        preferred_element_type=jnp.float32)
    # Rows stay on their batch shards and the vocabulary on the tensor axis: without this hint XLA may
    # gather a whole-batch chunk of logits onto every device.
    return constrain(logits, ("batch", None, "vocab"))


def _is_target(targets, vocab_size):
    # A comparison against an iota instead of a gather: it fuses into the surrounding elementwise work
    # and stays local when the vocabulary axis is sharded.
    return jax.lax.broadcasted_iota(jnp.int32, (*targets.shape, vocab_size), 2) == targets[..., None]


def _chunked(hidden, targets, mask, chunk):
    """[B, S, ...] -> [n, B, chunk, ...]: chunks lead (scanned); the batch axis and its sharding stay."""
    b, s = targets.shape
    n = s // chunk
    return (hidden.reshape(b, n, chunk, -1).swapaxes(0, 1), targets.reshape(b, n, chunk).swapaxes(0, 1),
            mask.reshape(b, n, chunk).swapaxes(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _summed_losses(hidden, kernel, targets, mask, chunk, compute_dtype):
    return _summed_losses_fwd(hidden, kernel, targets, mask, chunk, compute_dtype)[0]


def _summed_losses_fwd(hidden, kernel, targets, mask, chunk, compute_dtype):
    """Forward: per chunk, logits -> logsumexp and target logit; only the [B, S] logsumexp is kept."""
    hs, ts, ms = _chunked(hidden, targets, mask, chunk)

    def step(carry, xs):
        h, t, m = xs
        logits = _logits(h, kernel, compute_dtype)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.sum(jnp.where(_is_target(t, logits.shape[-1]), logits, 0.0), axis=-1)
        return (carry[0] + jnp.sum((lse - target_logit) * m), carry[1] + jnp.sum(jnp.square(lse) * m)), lse

    zero = jnp.zeros((), jnp.float32)
    sums, lse = jax.lax.scan(step, (zero, zero), (hs, ts, ms))
    return sums, (hidden, kernel, targets, mask, lse)


def _summed_losses_bwd(chunk, compute_dtype, residuals, cotangents):
    """Backward: recompute each chunk's logits once and form d(logits) = g * (softmax - onehot) + z-loss
    term directly, instead of differentiating through logsumexp and the target pick (which keeps several
    [B, chunk, V] fp32 temporaries alive and was 2x slower on CPU)."""
    hidden, kernel, targets, mask, lse = residuals
    g_loss, g_z = cotangents
    hs, ts, ms = _chunked(hidden, targets, mask, chunk)

    def step(d_kernel, xs):
        h, t, m, chunk_lse = xs
        logits = _logits(h, kernel, compute_dtype)
        probs = jnp.exp(logits - chunk_lse[..., None])
        weight = (m * g_loss)[..., None]
        d_logits = weight * (probs - _is_target(t, logits.shape[-1])) + (2.0 * g_z * m * chunk_lse)[..., None] * probs
        d_logits = d_logits.astype(compute_dtype)
        d_h = jnp.einsum("bcv,ev->bce", d_logits, kernel.astype(compute_dtype), preferred_element_type=jnp.float32)
        d_kernel = d_kernel + jnp.einsum("bce,bcv->ev", h.astype(compute_dtype), d_logits,
                                         preferred_element_type=jnp.float32)
        return d_kernel, d_h.astype(hidden.dtype)

    d_kernel, d_hs = jax.lax.scan(step, jnp.zeros(kernel.shape, jnp.float32), (hs, ts, ms, lse))
    b, s, e = hidden.shape
    d_hidden = d_hs.swapaxes(0, 1).reshape(b, s, e)
    return d_hidden, d_kernel.astype(kernel.dtype), None, None


_summed_losses.defvjp(_summed_losses_fwd, _summed_losses_bwd)


def chunked_cross_entropy(hidden, lm_kernel, targets, loss_mask, *, chunk_size: int,
                          z_loss_weight: float = 0.0, compute_dtype=jnp.float32):
    """Summed next-token cross-entropy of ``hidden`` [B, S, E] projected by ``lm_kernel`` [E, V].

    Returns ``(loss_sum, token_count, z_loss_sum)``, all fp32 scalars: ``loss_sum`` is the sum of
    ``-log p(target)`` over tokens where ``loss_mask`` is non-zero (weighted by it), ``token_count`` is
    ``sum(loss_mask)`` and ``z_loss_sum`` is ``z_loss_weight * sum(mask * logsumexp(logits)^2)``
    (PaLM-style auxiliary loss keeping the softmax normaliser near 1; zero when the weight is zero).
    S need not be a multiple of ``chunk_size``: the tail is padded with masked-out positions.

    The logits of one chunk at a time exist, in the forward and in the (hand-written) backward pass.
    Gradients flow to ``hidden`` and ``lm_kernel``; targets and mask are data.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    s = hidden.shape[1]
    chunk = min(chunk_size, s)
    pad = -s % chunk
    mask = loss_mask.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    loss_sum, z_sum = _summed_losses(hidden, lm_kernel, targets.astype(jnp.int32), mask, chunk,
                                     jnp.dtype(compute_dtype))
    return loss_sum, jnp.sum(mask), z_loss_weight * z_sum
