"""Cross-entropy over a huge vocabulary without ever materialising [B, S, V] logits.

With V = 131,072 a single 8k-token row of fp32 logits is 4 GiB, and the backward pass would keep it
alive. Instead the sequence is cut into chunks; each chunk's logits are computed, reduced to per-token
losses and discarded. The backward pass is written by hand (a custom VJP): it recomputes a chunk's
logits from its (small) hidden slice and forms d(logits) = softmax - onehot directly, so neither pass
ever holds more than one chunk of logits.

Communication under FSDP: the LM head is gathered once (not once per chunk, and not again in the
backward pass), and its gradient is accumulated per device over all chunks and reduced across devices
once, in the reduction dtype. Per chunk, that saves a gather of the whole head in each pass and an fp32
reduce-scatter of its gradient (on the 12B reference step, 19 GB of collectives per step).

An int8 head (``model/quant.py``: ``Int8Head``, a quantized base with ``quant.embeddings``) is gathered in
int8 and converted chunk by chunk inside the logits' dot, so no compute-dtype copy of the whole head
exists; its per-vocabulary scales multiply the fp32 logits (and d(logits) before the backward dot). It is
frozen: its gradient is never formed.

The function returns *sums*, not means: the training step divides by the number of counted tokens over
the whole global batch (all packed documents and all gradient-accumulation micro-batches), which makes
accumulating N micro-batches exactly equal to one N-times-larger batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from apriel_jax.model.quant import Int8Head
from apriel_jax.parallel.rules import active_rules, batch_degree, constrain


def _row_groups(rows: int) -> int:
    """How many devices ``rows`` batch rows are split over on the mesh being traced under (1 without a
    mesh, or when they do not divide evenly and XLA pads them)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    degree = batch_degree(mesh, active_rules())
    return degree if rows % degree == 0 else 1


def _gathered_kernel(kernel, compute_dtype):
    """The LM head in the compute dtype, whole along the embedding axis on every device (only the
    vocabulary stays split over the tensor axis): cast first so the all-gather moves compute-dtype bytes,
    and done once, outside the chunk loop, so the loop body gathers nothing. An int8 head is gathered as
    it is (half the bytes) and converted per chunk."""
    if isinstance(kernel, Int8Head):
        return Int8Head(constrain(kernel.values, (None, "vocab")), constrain(kernel.scales, ("vocab",)))
    return constrain(kernel.astype(compute_dtype), (None, "vocab"))


def _logits(h, kernel, compute_dtype):
    """[G, b, chunk, E] x [E, V] -> fp32 [G, b, chunk, V]; G = the devices the rows are split over."""
    if isinstance(kernel, Int8Head):
        logits = kernel.logits(h, compute_dtype)
    else:
        logits = jnp.einsum("gbce,ev->gbcv", h.astype(compute_dtype), kernel, preferred_element_type=jnp.float32)
    # Rows stay on their batch shards and the vocabulary on the tensor axis: without this hint XLA may
    # gather a whole-batch chunk of logits onto every device.
    return constrain(logits, ("batch", None, None, "vocab"))


def _is_target(targets, vocab_size):
    # A comparison against an iota instead of a gather: it fuses into the surrounding elementwise work
    # and stays local when the vocabulary axis is sharded.
    return jax.lax.broadcasted_iota(jnp.int32, (*targets.shape, vocab_size), targets.ndim) == targets[..., None]


def _chunked(hidden, targets, mask, chunk, groups):
    """[B, S, ...] -> [n, G, B/G, chunk, ...]: chunks lead (scanned), then the G row groups, one per batch
    device (an axis of its own, so a sum over rows can stay per device until the end)."""
    b, s = targets.shape
    n = s // chunk

    def split(x):
        x = x.reshape(groups, b // groups, n, chunk, *x.shape[2:])
        x = jnp.moveaxis(x, 2, 0)
        return constrain(x, (None, "batch", *(None,) * (x.ndim - 2)))

    return split(hidden), split(targets), split(mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _summed_losses(hidden, kernel, targets, mask, chunk, compute_dtype, reduce_dtype):
    return _summed_losses_fwd(hidden, kernel, targets, mask, chunk, compute_dtype, reduce_dtype)[0]


def _summed_losses_fwd(hidden, kernel, targets, mask, chunk, compute_dtype, reduce_dtype):
    """Forward: per chunk, logits -> logsumexp and target logit; only the [B, S] logsumexp is kept."""
    groups = _row_groups(targets.shape[0])
    hs, ts, ms = _chunked(hidden, targets, mask, chunk, groups)
    whole = _gathered_kernel(kernel, compute_dtype)

    def step(carry, xs):
        h, t, m = xs
        logits = _logits(h, whole, compute_dtype)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.sum(jnp.where(_is_target(t, logits.shape[-1]), logits, 0.0), axis=-1)
        return (carry[0] + jnp.sum((lse - target_logit) * m), carry[1] + jnp.sum(jnp.square(lse) * m)), lse

    zero = jnp.zeros((), jnp.float32)
    sums, lse = jax.lax.scan(step, (zero, zero), (hs, ts, ms))
    # The gathered head is kept for the backward pass rather than gathered a second time.
    return sums, (hidden, kernel, whole, targets, mask, lse)


def _summed_losses_bwd(chunk, compute_dtype, reduce_dtype, residuals, cotangents):
    """Backward: recompute each chunk's logits once and form d(logits) = g * (softmax - onehot) + z-loss
    term directly, instead of differentiating through logsumexp and the target pick (which keeps several
    [B, chunk, V] fp32 temporaries alive and was 2x slower on CPU).

    The LM head's gradient is summed over the chunks per row group, i.e. on each device without any
    communication, and reduced across devices once at the end, both in ``reduce_dtype``."""
    hidden, kernel, whole, targets, mask, lse = residuals
    quantized = isinstance(kernel, Int8Head)
    g_loss, g_z = cotangents
    groups = _row_groups(targets.shape[0])
    hs, ts, ms = _chunked(hidden, targets, mask, chunk, groups)

    def step(d_partial, xs):
        h, t, m, chunk_lse = xs
        h = h.astype(compute_dtype)
        logits = _logits(h, whole, compute_dtype)
        probs = jnp.exp(logits - chunk_lse[..., None])
        weight = (m * g_loss)[..., None]
        d_logits = weight * (probs - _is_target(t, logits.shape[-1])) + (2.0 * g_z * m * chunk_lse)[..., None] * probs
        if quantized:  # d(h) = (d_logits * scales) @ values^T; the frozen head gets no gradient
            d_h = jnp.einsum("gbcv,ev->gbce", (d_logits * whole.scales).astype(compute_dtype),
                             whole.values.astype(compute_dtype), preferred_element_type=jnp.float32)
            return d_partial, d_h.astype(hidden.dtype)
        d_logits = d_logits.astype(compute_dtype)
        d_h = jnp.einsum("gbcv,ev->gbce", d_logits, whole, preferred_element_type=jnp.float32)
        contribution = jnp.einsum("gbce,gbcv->gev", h, d_logits, preferred_element_type=jnp.float32)
        d_partial = d_partial + contribution.astype(reduce_dtype)
        return constrain(d_partial, ("batch", None, "vocab")), d_h.astype(hidden.dtype)

    # The per-device sum is a whole [E, V / tensor] head: kept in the reduction dtype, it costs 1.3 GB
    # in bf16 for a 12B model rather than 2.7 GB in fp32, at the price of one bf16 rounding per chunk
    # (the cross-device sum is in that dtype anyway). A frozen int8 head carries none (None).
    d_partial = None
    if not quantized:
        d_partial = constrain(jnp.zeros((groups, *kernel.shape), reduce_dtype), ("batch", None, "vocab"))
    d_partial, d_hs = jax.lax.scan(step, d_partial, (hs, ts, ms, lse))
    b, s, width = hidden.shape
    d_hidden = jnp.moveaxis(d_hs, 0, 2).reshape(b, s, width)
    if quantized:
        return d_hidden, None, None, None
    # The one cross-device reduction of the head's gradient: the sum over row groups, landing in the
    # parameter's own (embed, vocab) sharding.
    d_kernel = constrain(jnp.sum(d_partial, axis=0, dtype=reduce_dtype), ("embed", "vocab"))
    return d_hidden, d_kernel.astype(kernel.dtype), None, None


_summed_losses.defvjp(_summed_losses_fwd, _summed_losses_bwd)


def chunked_cross_entropy(hidden, lm_kernel, targets, loss_mask, *, chunk_size: int,
                          z_loss_weight: float = 0.0, compute_dtype=jnp.float32, grad_reduce_dtype=None):
    """Summed next-token cross-entropy of ``hidden`` [B, S, E] projected by ``lm_kernel`` [E, V] (an array,
    or a frozen ``Int8Head``).

    Returns ``(loss_sum, token_count, z_loss_sum)``, all fp32 scalars: ``loss_sum`` is the sum of
    ``-log p(target)`` over tokens where ``loss_mask`` is non-zero (weighted by it), ``token_count`` is
    ``sum(loss_mask)`` and ``z_loss_sum`` is ``z_loss_weight * sum(mask * logsumexp(logits)^2)``
    (PaLM-style auxiliary loss keeping the softmax normaliser near 1; zero when the weight is zero).
    S need not be a multiple of ``chunk_size``: the tail is padded with masked-out positions.

    The logits of one chunk at a time exist, in the forward and in the (hand-written) backward pass.
    Gradients flow to ``hidden`` and ``lm_kernel``; targets and mask are data. On a mesh the (FSDP-split)
    ``lm_kernel`` is gathered once per call, in ``compute_dtype``, and its gradient is reduced across
    devices once per call, in ``grad_reduce_dtype`` (default: ``compute_dtype``, like the layers' gradients).
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
                                     jnp.dtype(compute_dtype), jnp.dtype(grad_reduce_dtype or compute_dtype))
    return loss_sum, jnp.sum(mask), z_loss_weight * z_sum
