"""Our own flash attention for GPU (Pallas, Triton lowering), forward and backward.

Same contract and numerics as ``flash_tpu.py`` (segment ids, causal or bidirectional, GQA, head_dim 64 and
128, finite masking, padding to the block inside the wrapper, decoding and sliding windows refused), laid
out the Triton way:

- Kernels read the model's [B, S, H, D] layout directly (Triton loads strided tiles; no transposes).
- One program per (row, query block, query head) walks the key blocks in a ``fori_loop``; causal rows stop
  at the diagonal block, so fully masked blocks are never loaded.
- The backward recomputes probabilities from the saved logsumexp: the dq program walks key blocks; the
  dk/dv program owns one key block of one kv head and walks the query blocks of every query head in its
  group (GQA without repeating k/v, and without a per-query-head dk buffer).

On a non-GPU backend the kernels run with ``interpret=True`` (tests on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from apriel_jax.kernels.attention import register, target_platform
from apriel_jax.kernels.flash_tpu import (
    KV_PAD_SEGMENT,
    MASK_VALUE,
    Q_PAD_SEGMENT,
    check_supported,
    pick_blocks,
)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _masked_logits(q, k, q_seg, k_seg, q_start, k_start, *, scale, causal):
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    mask = q_seg[:, None] == k_seg[None, :]
    if causal:
        q_idx = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        k_idx = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = jnp.logical_and(mask, k_idx <= q_idx)
    return jnp.where(mask, s, MASK_VALUE)


def _kv_blocks_for(i, bq: int, bk: int, nk: int, causal: bool):
    """Number of key blocks query block ``i`` must visit (all, or up to the diagonal)."""
    return jnp.minimum(nk, (i * bq + bq - 1) // bk + 1) if causal else nk


# ----------------------------------------------------------------------------------------------- forward
def _fwd_kernel(q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, causal, bq, bk, nk):
    i = pl.program_id(1)
    q, q_seg = q_ref[...], q_seg_ref[...]
    d = q.shape[-1]

    def body(j, carry):
        m, l, acc = carry
        keys = pl.ds(j * bk, bk)
        v = v_ref[keys, :]
        s = _masked_logits(q, k_ref[keys, :], q_seg, k_seg_ref[keys], i * bq, j * bk, scale=scale, causal=causal)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, _kv_blocks_for(i, bq, bk, nk, causal), body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _forward(q, k, v, q_seg, kv_seg, *, causal, scale, bq, bk, interpret, num_warps, num_stages):
    """[B, S, H, D] inputs with S a multiple of both blocks. Returns out and lse [B, Hq, S] (fp32)."""
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk, nk=s // bk)
    q_spec = pl.BlockSpec((None, bq, None, d), lambda b_, i, h: (b_, i, h, 0))
    kv_spec = pl.BlockSpec((None, s, None, d), lambda b_, i, h: (b_, 0, h // group, 0))
    return pl.pallas_call(
        kernel,
        grid=(b, s // bq, hq),
        in_specs=[pl.BlockSpec((None, bq), lambda b_, i, h: (b_, i)),
                  pl.BlockSpec((None, s), lambda b_, i, h: (b_, 0)), q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b_, i, h: (b_, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, s), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="apriel_flash_fwd_gpu",
    )(q_seg, kv_seg, q, k, v)


# ---------------------------------------------------------------------------------------------- backward
def _dq_kernel(q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, causal, bq, bk, nk):
    i = pl.program_id(1)
    q, do, q_seg = q_ref[...], do_ref[...], q_seg_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        keys = pl.ds(j * bk, bk)
        k = k_ref[keys, :]
        s = _masked_logits(q, k, q_seg, k_seg_ref[keys], i * bq, j * bk, scale=scale, causal=causal)
        p = jnp.exp(s - lse[:, None])
        dp = lax.dot_general(do, v_ref[keys, :], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, _kv_blocks_for(i, bq, bk, nk, causal), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale, causal, bq, bk, nq, group):
    j = pl.program_id(1)
    k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]
    first = (j * bk) // bq if causal else 0  # earlier query blocks cannot see this key block

    def body(i, carry, g):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        s = _masked_logits(q, k, q_seg_ref[rows], k_seg, i * bq, j * bk, scale=scale, causal=causal)
        p = jnp.exp(s - lse_ref[g, rows][:, None])  # [bq, bk]
        dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[g, rows][:, None])
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(group):  # static: the query heads sharing this kv head
        carry = lax.fori_loop(first, nq, functools.partial(body, g=g), carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, q_seg, kv_seg, out, lse, do, *, causal, scale, bq, bk, interpret, num_warps,
              num_stages):
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, Hq, S]
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    kw = {"scale": scale, "causal": causal, "bq": bq, "bk": bk}

    q_spec = pl.BlockSpec((None, bq, None, d), lambda b_, i, h: (b_, i, h, 0))
    kv_full = pl.BlockSpec((None, s, None, d), lambda b_, i, h: (b_, 0, h // group, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b_, i, h: (b_, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, nk=s // bk, **kw),
        grid=(b, s // bq, hq),
        in_specs=[pl.BlockSpec((None, bq), lambda b_, i, h: (b_, i)),
                  pl.BlockSpec((None, s), lambda b_, i, h: (b_, 0)),
                  q_spec, kv_full, kv_full, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="apriel_flash_bwd_dq_gpu",
    )(q_seg, kv_seg, q, k, v, do, lse, delta)

    kv_spec = pl.BlockSpec((None, bk, None, d), lambda b_, j, h: (b_, j, h, 0))
    q_group = pl.BlockSpec((None, s, group, d), lambda b_, j, h: (b_, 0, h, 0))  # this kv head's q heads
    rows_group = pl.BlockSpec((None, group, s), lambda b_, j, h: (b_, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, nq=s // bq, group=group, **kw),
        grid=(b, s // bk, hkv),
        in_specs=[pl.BlockSpec((None, s), lambda b_, j, h: (b_, 0)),
                  pl.BlockSpec((None, bk), lambda b_, j, h: (b_, j)),
                  q_group, kv_spec, kv_spec, q_group, rows_group, rows_group],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="apriel_flash_bwd_dkv_gpu",
    )(q_seg, kv_seg, q, k, v, do, lse, delta)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _flash(q, k, v, q_seg, kv_seg, causal, scale, bq, bk, interpret, num_warps, num_stages):
    return _forward(q, k, v, q_seg, kv_seg, causal=causal, scale=scale, bq=bq, bk=bk, interpret=interpret,
                    num_warps=num_warps, num_stages=num_stages)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, causal, scale, bq, bk, interpret, num_warps, num_stages):
    out, lse = _forward(q, k, v, q_seg, kv_seg, causal=causal, scale=scale, bq=bq, bk=bk, interpret=interpret,
                        num_warps=num_warps, num_stages=num_stages)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(causal, scale, bq, bk, interpret, num_warps, num_stages, residuals, do):
    dq, dk, dv = _backward(*residuals, do, causal=causal, scale=scale, bq=bq, bk=bk, interpret=interpret,
                           num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_gpu(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, scale: float | None = None,
                        block_q: int | None = None, block_k: int | None = None, interpret: bool | None = None,
                        num_warps: int | None = None, num_stages: int = 2) -> jax.Array:
    """Flash attention on [B, S, H, D] inputs (Triton on GPU, ``interpret=True`` elsewhere).

    Default blocks: 128 queries x 64 keys (head_dim 128 keeps the tiles within an SM's shared memory);
    Triton needs power-of-two blocks of at least 16."""
    check_supported(q, k)
    s, d = q.shape[1], q.shape[3]
    scale = d ** -0.5 if scale is None else float(scale)
    if interpret is None:
        interpret = target_platform() != "gpu"
    # Blocks: powers of two, shrunk for short sequences; the padded length is a multiple of both.
    short = max(16, pl.next_power_of_2(s))
    bq, bk, padded = pick_blocks(s, block_q or min(128, short), block_k or min(64, short), align=16)
    if num_warps is None:
        num_warps = 4 if d <= 64 else 8
    pad = padded - s
    q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=Q_PAD_SEGMENT)
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=KV_PAD_SEGMENT)

    def padded_seq(x):
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))

    out = _flash(padded_seq(q), padded_seq(k), padded_seq(v), q_seg, kv_seg, causal, scale, bq, bk,
                 bool(interpret), num_warps, num_stages)
    return out[:, :s]


@register("pallas_gpu")
def pallas_gpu_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, q_offset, sliding_window, scale):
    from apriel_jax.kernels.sharded import run_sharded

    check_supported(q, k, q_offset=q_offset, sliding_window=sliding_window)
    return run_sharded(functools.partial(flash_attention_gpu, causal=causal, scale=scale),
                       q, k, v, q_segment_ids, kv_segment_ids)
