"""Our own flash attention for TPU (Pallas, Mosaic lowering), forward and backward.

Why our own and not jax's splash kernel: the Pixtral vision tower has head_dim 64, which splash rejects
on real TPUs; and one kernel with segment ids covers both packed causal documents (decoder) and
block-diagonal bidirectional images (vision).

Design:
- Kernels work in [B, H, S, D] layout (Mosaic blocks need the last two dims to be (sequence, head_dim)).
  The wrapper transposes from the model's [B, S, H, D] and back.
- Online softmax over key blocks (grid axis marked "arbitrary"); the forward saves only the output and
  the per-row logsumexp. The backward recomputes probabilities from the logsumexp in two kernels: one
  reduces dq over key blocks, the other reduces dk/dv over (query head in the group, query block).
- Grouped-query attention: the k/v index_map maps query head h to kv head h // group, so k/v are never
  repeated in memory; dk/dv sum over the group inside the kernel.
- Masking uses a large finite value (as the xla oracle does), so a row with no visible key is a uniform
  average instead of NaN and every gradient stays finite.
- Causal: key blocks entirely above the diagonal are skipped (``pl.when``) and their index_map is
  clamped to the last needed block, so the pipeline issues no DMA for them either.
- Sequence lengths that are not a multiple of the block are padded inside the wrapper: padded queries get
  segment id -1 and padded keys -2, so they match nothing real (not even padding segment 0); the padded
  rows are sliced off.
- head_dim: 16, 32, 64, 128 or 256 (64 and 128 are the model's).
- Refused (ValueError): sliding windows, a non-zero ``q_offset`` / Sq != Sk (KV-cache decoding). The entry
  point (``kernels/attention.py``) sends decoding to the xla path instead.

On a non-TPU backend the kernels run in Pallas' TPU interpret mode (tests on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from apriel_jax.kernels.attention import register, target_platform

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
Q_PAD_SEGMENT, KV_PAD_SEGMENT = -1, -2
# Powers of two (Triton's dot needs >= 16 and power-of-two tiles); 64 and 128 are the model's and are
# compile-checked for TPU; the small ones serve the tiny test model.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
# dot_general dimension numbers: a @ b.T (contract the last dim of both).
_NT = (((1,), (1,)), ((), ()))


def _interpret(interpret: bool | None):
    if interpret is None:
        interpret = target_platform() != "tpu"
    return pltpu.InterpretParams() if interpret else False


def _visible(q_seg, k_seg, q_start, k_start, shape, causal: bool, q_axis: int):
    """Boolean block mask: same segment (and key index <= query index if causal).

    ``q_axis`` says which axis of the [rows, cols] block indexes queries (0 in forward/dq, 1 in dk/dv,
    where the block is transposed)."""
    mask = q_seg == k_seg
    if causal:
        q_idx = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_idx = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
        mask = jnp.logical_and(mask, k_idx <= q_idx)
    return mask


# ----------------------------------------------------------------------------------------------- forward
def _fwd_kernel(q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                scale: float, causal: bool, bq: int, bk: int):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        mask = _visible(q_seg_ref[...], k_seg_ref[...], i * bq, j * bk, (bq, bk), causal, 0)
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = m_new

    if causal:  # skip key blocks that lie entirely above the diagonal
        pl.when(j * bk <= i * bq + bq - 1)(_step)
    else:
        _step()

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l)


def _last_kv_block(i, bq: int, bk: int):
    return (i * bq + bq - 1) // bk


def _first_q_block(j, bq: int, bk: int):
    return (j * bk) // bq


def _forward(q, k, v, q_seg_col, kv_seg_row, *, causal, scale, bq, bk, interpret):
    """q [B, Hq, S, D], k/v [B, Hkv, S, D], q_seg_col [B, S, 1], kv_seg_row [B, 1, S] (S padded).
    Returns out [B, Hq, S, D] and lse [B, Hq, S, 1] (fp32)."""
    b, hq, s, d = q.shape
    group = hq // k.shape[1]
    nq, nk = s // bq, s // bk

    def kv_block(i, j):  # clamp: skipped causal blocks re-use the previous block (no new DMA)
        return jnp.minimum(j, _last_kv_block(i, bq, bk)) if causal else j

    in_specs = [
        pl.BlockSpec((None, bq, 1), lambda b_, h, i, j: (b_, i, 0)),
        pl.BlockSpec((None, 1, bk), lambda b_, h, i, j: (b_, 0, kv_block(i, j))),
        pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j: (b_, h, i, 0)),
        pl.BlockSpec((None, None, bk, d), lambda b_, h, i, j: (b_, h // group, kv_block(i, j), 0)),
        pl.BlockSpec((None, None, bk, d), lambda b_, h, i, j: (b_, h // group, kv_block(i, j), 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j: (b_, h, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda b_, h, i, j: (b_, h, i, 0)),
    ]
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk)
    return pl.pallas_call(
        kernel,
        grid=(b, hq, nq, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, s, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="apriel_flash_fwd",
    )(q_seg_col, kv_seg_row, q, k, v)


# ---------------------------------------------------------------------------------------------- backward
def _dq_kernel(q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *,
               scale: float, causal: bool, bq: int, bk: int):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def _step():
        k = k_ref[...]
        s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
        mask = _visible(q_seg_ref[...], k_seg_ref[...], i * bq, j * bk, (bq, bk), causal, 0)
        p = jnp.exp(jnp.where(mask, s, MASK_VALUE) - lse_ref[...])  # [bq, bk]
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    if causal:
        pl.when(j * bk <= i * bq + bq - 1)(_step)
    else:
        _step()

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_seg_ref, k_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, scale: float, causal: bool, bq: int, bk: int):
    # Grid (b, kv head, key block j, head in group g, query block i): the block is transposed
    # ([keys, queries]) so lse/delta are used as rows and dk, dv are plain matmuls.
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def _step():
        q, do = q_ref[...], do_ref[...]
        s_t = lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32) * scale  # [bk, bq]
        mask = _visible(q_seg_ref[...], k_seg_ref[...], i * bq, j * bk, (bk, bq), causal, 1)
        p_t = jnp.exp(jnp.where(mask, s_t, MASK_VALUE) - lse_ref[...])
        dv_sc[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_sc[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    if causal:  # skip query blocks entirely before this key block
        pl.when(i * bq + bq - 1 >= j * bk)(_step)
    else:
        _step()

    @pl.when(jnp.logical_and(g == pl.num_programs(3) - 1, i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(q, k, v, q_seg, kv_seg, out, lse, do, *, causal, scale, bq, bk, interpret):
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nq, nk = s // bq, s // bk
    # delta_i = sum_d out_i * do_i: the softmax-Jacobian term, cheap in XLA.
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    params = pltpu.CompilerParams
    kernel_kw = {"scale": scale, "causal": causal, "bq": bq, "bk": bk}

    def kv_block(i, j):
        return jnp.minimum(j, _last_kv_block(i, bq, bk)) if causal else j

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, i, j: (b_, h // group, kv_block(i, j), 0))
    col_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h, i, j: (b_, h, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kernel_kw),
        grid=(b, hq, nq, nk),
        in_specs=[pl.BlockSpec((None, bq, 1), lambda b_, h, i, j: (b_, i, 0)),
                  pl.BlockSpec((None, 1, bk), lambda b_, h, i, j: (b_, 0, kv_block(i, j))),
                  q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=params(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="apriel_flash_bwd_dq",
    )(q_seg[:, :, None], kv_seg[:, None, :], q, k, v, do, lse, delta)

    def q_block(j, i):  # clamp: skipped causal blocks re-use the next needed block
        return jnp.maximum(i, _first_q_block(j, bq, bk)) if causal else i

    q_spec_t = pl.BlockSpec((None, None, bq, d), lambda b_, h, j, g, i: (b_, h * group + g, q_block(j, i), 0))
    row_spec_t = pl.BlockSpec((None, None, 1, bq), lambda b_, h, j, g, i: (b_, h * group + g, 0, q_block(j, i)))
    kv_spec_t = pl.BlockSpec((None, None, bk, d), lambda b_, h, j, g, i: (b_, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kernel_kw),
        grid=(b, hkv, nk, group, nq),
        in_specs=[pl.BlockSpec((None, 1, bq), lambda b_, h, j, g, i: (b_, 0, q_block(j, i))),
                  pl.BlockSpec((None, bk, 1), lambda b_, h, j, g, i: (b_, j, 0)),
                  q_spec_t, kv_spec_t, kv_spec_t, q_spec_t, row_spec_t, row_spec_t],
        out_specs=[kv_spec_t, kv_spec_t],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=params(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=_interpret(interpret),
        name="apriel_flash_bwd_dkv",
    )(q_seg[:, None, :], kv_seg[:, :, None], q, k, v, do,
      lse.reshape(b, hq, 1, s), delta.reshape(b, hq, 1, s))
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, q_seg, kv_seg, causal, scale, bq, bk, interpret):
    out, _ = _forward(q, k, v, q_seg[:, :, None], kv_seg[:, None, :], causal=causal, scale=scale, bq=bq,
                      bk=bk, interpret=interpret)
    return out


def _flash_fwd(q, k, v, q_seg, kv_seg, causal, scale, bq, bk, interpret):
    out, lse = _forward(q, k, v, q_seg[:, :, None], kv_seg[:, None, :], causal=causal, scale=scale, bq=bq,
                        bk=bk, interpret=interpret)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(causal, scale, bq, bk, interpret, residuals, do):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, do, causal=causal, scale=scale, bq=bq, bk=bk,
                           interpret=interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------- wrapper
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pick_blocks(seq: int, block_q: int | None, block_k: int | None, *, align: int) -> tuple[int, int, int]:
    """(block_q, block_k, padded sequence length). Defaults: 512 (Mosaic needs multiples of 128 on TPU),
    shrunk for short sequences; the padded length is a multiple of both blocks."""
    short = _round_up(seq, align)
    bq = block_q or min(512, short)
    bk = block_k or min(512, short)
    big, small = max(bq, bk), min(bq, bk)
    if big % small:
        raise ValueError(f"block sizes must divide each other, got block_q={bq}, block_k={bk}")
    return bq, bk, _round_up(seq, big)


def check_supported(q, k, *, q_offset=0, sliding_window: int = 0, head_dims=SUPPORTED_HEAD_DIMS) -> None:
    """Raise ValueError for calls our flash kernels do not handle (decoding, windows, odd head dims)."""
    if sliding_window:
        raise ValueError("the pallas flash kernels do not implement sliding_window; use impl='xla'")
    if not (isinstance(q_offset, int) and q_offset == 0) or q.shape[1] != k.shape[1]:
        raise ValueError("the pallas flash kernels are for training (q_offset 0, Sq == Sk); KV-cache decoding "
                         "goes through impl='xla'")
    if q.shape[-1] not in head_dims:
        raise ValueError(f"the pallas flash kernels support head_dim in {head_dims}, got {q.shape[-1]}")


def flash_attention_tpu(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, scale: float | None = None,
                        block_q: int | None = None, block_k: int | None = None,
                        interpret: bool | None = None) -> jax.Array:
    """Flash attention on [B, S, H, D] inputs (Mosaic on TPU, TPU interpret mode elsewhere)."""
    check_supported(q, k)
    s, d = q.shape[1], q.shape[3]
    scale = d ** -0.5 if scale is None else float(scale)
    on_tpu = not (interpret if interpret is not None else target_platform() != "tpu")
    bq, bk, padded = pick_blocks(s, block_q, block_k, align=128 if on_tpu else 8)
    pad = padded - s
    q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=Q_PAD_SEGMENT)
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=KV_PAD_SEGMENT)

    def to_bhsd(x):
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    out = _flash(to_bhsd(q), to_bhsd(k), to_bhsd(v), q_seg, kv_seg, causal, scale, bq, bk, interpret)
    return out.transpose(0, 2, 1, 3)[:, :s]


@register("pallas_tpu")
def pallas_tpu_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, q_offset, sliding_window, scale):
    from apriel_jax.kernels.sharded import run_sharded

    check_supported(q, k, q_offset=q_offset, sliding_window=sliding_window)
    return run_sharded(functools.partial(flash_attention_tpu, causal=causal, scale=scale),
                       q, k, v, q_segment_ids, kv_segment_ids)
