"""The XLA attention oracle against a direct per-document numpy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apriel_jax.kernels.attention import attention


def reference(q, k, v, q_seg, kv_seg, causal, q_offset=0, window=0):
    """Loop-per-query numpy attention: softmax over the keys of the same segment (and causal window)."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    out = np.zeros_like(q, dtype=np.float64)
    for bi in range(b):
        for i in range(sq):
            qi = q_offset + i
            keys = [j for j in range(k.shape[1]) if kv_seg[bi, j] == q_seg[bi, i]
                    and (not causal or j <= qi) and (not window or qi - j < window)]
            if not keys:
                continue
            for h in range(hq):
                kh = h // (hq // hkv)
                s = np.array([q[bi, i, h] @ k[bi, j, kh] for j in keys]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, h] = sum(pj * v[bi, j, kh] for pj, j in zip(p, keys))
    return out


def packed_segments(rng, b, s, max_docs=3):
    seg = np.zeros((b, s), np.int32)
    for bi in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s - 2), size=max_docs - 1, replace=False))
        bounds = [0, *cuts, s - 2]  # the last two positions are padding (segment 0)
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            seg[bi, lo:hi] = doc
    return seg


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (4, 2, 32), (8, 1, 8)])
def test_matches_per_document_reference(causal, hq, hkv, d):
    rng = np.random.default_rng(hq * 10 + hkv + causal)
    b, s = 2, 19
    q = rng.normal(size=(b, s, hq, d)).astype(np.float32)
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    seg = packed_segments(rng, b, s)
    got = np.asarray(attention(q, k, v, seg, seg, causal=causal))
    want = reference(q, k, v, seg, seg, causal)
    real = seg != 0
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_documents_do_not_see_each_other():
    """Changing one document's keys/values must not change another document's outputs."""
    rng = np.random.default_rng(0)
    b, s, h, d = 1, 12, 2, 8
    q, k, v = (rng.normal(size=(b, s, h, d)).astype(np.float32) for _ in range(3))
    seg = np.array([[1] * 5 + [2] * 7], np.int32)
    base = np.asarray(attention(q, k, v, seg, seg, causal=False))
    k2, v2 = k.copy(), v.copy()
    k2[:, :5] += 3.0
    v2[:, :5] -= 2.0
    changed = np.asarray(attention(q, k2, v2, seg, seg, causal=False))
    np.testing.assert_array_equal(base[:, 5:], changed[:, 5:])
    assert np.abs(base[:, :5] - changed[:, :5]).max() > 1e-3


def test_sliding_window_and_decode_offset():
    rng = np.random.default_rng(1)
    b, s, hq, hkv, d = 2, 10, 4, 2, 8
    q = rng.normal(size=(b, s, hq, d)).astype(np.float32)
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    seg = np.ones((b, s), np.int32)
    got = np.asarray(attention(q, k, v, seg, seg, causal=True, sliding_window=3))
    np.testing.assert_allclose(got, reference(q, k, v, seg, seg, True, window=3), rtol=1e-5, atol=1e-5)
    # One query at offset 6 against the full key sequence equals row 6 of the full computation.
    full = np.asarray(attention(q, k, v, seg, seg, causal=True))
    one = np.asarray(attention(q[:, 6:7], k, v, seg[:, 6:7], seg, causal=True, q_offset=6))
    np.testing.assert_allclose(one[:, 0], full[:, 6], rtol=1e-5, atol=1e-6)


def test_gradients_are_finite_with_padding_rows():
    rng = np.random.default_rng(2)
    b, s, h, d = 1, 8, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32) for _ in range(3))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0]], jnp.int32)
    grads = jax.grad(lambda q, k, v: attention(q, k, v, seg, seg, causal=True).sum(), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


def test_errors():
    x = np.zeros((1, 4, 3, 8), np.float32)
    kv = np.zeros((1, 4, 2, 8), np.float32)
    seg = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="multiple"):
        attention(x, kv, kv, seg, seg, causal=True)
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(kv, kv, kv, seg, seg, causal=True, impl="nope")
    with pytest.raises(ValueError, match="causal"):
        attention(kv, kv, kv, seg, seg, causal=False, sliding_window=2)
