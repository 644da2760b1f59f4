"""``splash``: jax's packaged TPU splash-attention kernel, kept as a baseline for our own Mosaic kernel.

Splash takes per-example [H, S, D] inputs with segment ids, no scale argument (q is pre-scaled here) and
sequence lengths that are multiples of its blocks (padded here with segment ids that match nothing).
It runs per device inside ``shard_map`` (see ``sharded.py``).

Refused (ValueError): head_dim other than a multiple of 128 (on TPU splash needs head_dim to fill the
128 lanes; the vision tower's 64 fails, jax issue 30861: use ``pallas``), sliding windows, KV-cache
decoding. Off TPU it runs in interpret mode (tests only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from apriel_jax.kernels.attention import register, target_platform
from apriel_jax.kernels.flash_tpu import KV_PAD_SEGMENT, Q_PAD_SEGMENT, pick_blocks


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, scale: float, interpret: bool):
    s, hq = q.shape[1], q.shape[2]
    bq, bk, padded = pick_blocks(s, None, None, align=128)
    pad = padded - s
    q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=Q_PAD_SEGMENT)
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=KV_PAD_SEGMENT)

    def to_hsd(x):
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    head_mask = sa.CausalMask((padded, padded)) if causal else sa.FullMask((padded, padded))
    blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                           block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * hq), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    qs = (to_hsd(q).astype(jnp.float32) * scale).astype(q.dtype)

    def one(qi, ki, vi, qsi, ksi):
        return kernel(qi, ki, vi, sa.SegmentIds(q=qsi, kv=ksi))

    out = jax.vmap(one)(qs, to_hsd(k), to_hsd(v), q_seg, kv_seg)
    return out.transpose(0, 2, 1, 3)[:, :s]


@register("splash")
def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, q_offset, sliding_window, scale):
    from apriel_jax.kernels.sharded import run_sharded

    d = q.shape[-1]
    if d % 128:
        raise ValueError(f"jax's splash kernel needs head_dim to be a multiple of 128 on TPU, got {d} "
                         "(the vision tower's 64 included): use impl='pallas'")
    if sliding_window:
        raise ValueError("the splash baseline here does not take sliding_window; use impl='xla'")
    if not (isinstance(q_offset, int) and q_offset == 0) or q.shape[1] != k.shape[1]:
        raise ValueError("splash is a training kernel (q_offset 0, Sq == Sk); decoding uses impl='xla'")
    interpret = target_platform() != "tpu"
    return run_sharded(functools.partial(_splash_local, causal=causal, scale=scale, interpret=interpret),
                       q, k, v, q_segment_ids, kv_segment_ids)
