"""``xla_blocked`` (block-skipping plain-XLA attention with a hand-written backward) against the ``xla`` oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apriel_jax.kernels.attention import attention, resolve_impl, xla_attention
from apriel_jax.kernels.blocked_xla import blocked_attention


def packed_segments(rng, b, s, max_docs=4):
    """Random packed documents per row, the last two positions padding (segment 0)."""
    seg = np.zeros((b, s), np.int32)
    for bi in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s - 2), size=max_docs - 1, replace=False))
        for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, s - 2]), start=1):
            seg[bi, lo:hi] = doc
    return seg


def inputs(seed, b, s, hq, hkv, d):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, s, hq, d)).astype(np.float32)
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    d_out = rng.normal(size=(b, s, hq, d)).astype(np.float32)
    return q, k, v, packed_segments(rng, b, s), d_out


def value_and_grads(fn, q, k, v, d_out):
    """(out, dq, dk, dv) of ``fn`` for the cotangent d_out, compiled as one program."""

    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run)(q, k, v, d_out)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s,block_q,hq,hkv,d", [(37, 8, 4, 2, 16), (40, 16, 8, 1, 8), (33, 64, 2, 2, 32)])
def test_forward_and_gradients_match_xla(causal, s, block_q, hq, hkv, d):
    """Forward and q/k/v gradients on packed segments: GQA, S not a multiple of the block, one-block case."""
    q, k, v, seg, d_out = inputs(s * 7 + hq + causal, 2, s, hq, hkv, d)
    scale = d**-0.5
    common = dict(causal=causal, q_offset=0, sliding_window=0, scale=scale)
    want = value_and_grads(lambda q, k, v: xla_attention(q, k, v, seg, seg, **common), q, k, v, d_out)
    got = value_and_grads(lambda q, k, v: blocked_attention(q, k, v, seg, seg, block_q=block_q, **common),
                          q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


def test_sliding_window_matches_xla():
    """Blocks whose key prefix starts late (keys before the window skipped) stay exact."""
    q, k, v, seg, d_out = inputs(3, 2, 45, 4, 2, 8)
    common = dict(causal=True, q_offset=0, sliding_window=11, scale=0.3)
    want = value_and_grads(lambda q, k, v: xla_attention(q, k, v, seg, seg, **common), q, k, v, d_out)
    got = value_and_grads(lambda q, k, v: blocked_attention(q, k, v, seg, seg, block_q=8, **common), q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


def test_entry_point_and_auto_dispatch():
    """``impl="xla_blocked"`` through the entry point (default block size), and ``auto`` picks it on CPU."""
    q, k, v, seg, d_out = inputs(5, 1, 300, 4, 2, 16)  # 300 = one full block of 256 and a partial one
    want = value_and_grads(lambda q, k, v: attention(q, k, v, seg, seg, causal=True), q, k, v, d_out)
    got = value_and_grads(lambda q, k, v: attention(q, k, v, seg, seg, causal=True, impl="xla_blocked"),
                          q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)
    if jax.default_backend() == "cpu":
        assert resolve_impl("auto", jnp.asarray(q), jnp.asarray(k)) == "xla_blocked"


def test_decoding_falls_back_to_xla():
    """A non-zero q_offset (KV-cache decoding) is the oracle's job; called directly it defers to it."""
    q, k, v, seg, _ = inputs(9, 1, 12, 2, 1, 8)
    common = dict(causal=True, q_offset=3, sliding_window=0, scale=0.5)
    got = blocked_attention(q[:, :4], k, v, seg[:, :4], seg, **common)
    want = xla_attention(q[:, :4], k, v, seg[:, :4], seg, **common)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
