"""Our Pallas flash kernels (TPU Mosaic and GPU Triton, in interpret mode on CPU) against the xla oracle.

Outputs and gradients of q, k, v on random packed inputs: several documents per row plus padding
(segment 0), causal and bidirectional, GQA (4/2 and 4/1 heads), head_dim 64 and 128, a sequence length
that is not a multiple of the block, fp32 and bf16. Shapes are tiny: interpret mode runs every grid step
in Python.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apriel_jax.kernels.attention import attention, resolve_impl
from apriel_jax.kernels.flash_gpu import flash_attention_gpu
from apriel_jax.kernels.flash_tpu import flash_attention_tpu

KERNELS = {"tpu": flash_attention_tpu, "gpu": flash_attention_gpu}
SEQ = 40  # not a multiple of the 16-wide blocks used below: the wrapper pads and slices


def packed_segments(rng, b, s):
    """Each row: 2-3 documents of random lengths, then 3 padding positions (segment 0)."""
    seg = np.zeros((b, s), np.int32)
    for row in range(b):
        docs = 2 + row % 2
        cuts = np.sort(rng.choice(np.arange(2, s - 4), size=docs - 1, replace=False))
        for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, s - 3]), start=1):
            seg[row, lo:hi] = doc
    return seg


def inputs(rng, hq, hkv, d, dtype, b=2, s=SEQ):
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, h, d)), dtype) for h in (hq, hkv, hkv))
    return q, k, v, jnp.asarray(packed_segments(rng, b, s))


def run_kernel(backend, q, k, v, seg, causal, kv_seg=None):
    return KERNELS[backend](q, k, v, seg, seg if kv_seg is None else kv_seg, causal=causal,
                            block_q=16, block_k=16, interpret=True)


def outputs_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent))


CASES = [  # (causal, hq, hkv, d, dtype)
    (True, 4, 2, 64, jnp.float32),
    (False, 4, 1, 128, jnp.float32),
    (True, 4, 1, 128, jnp.bfloat16),
    (False, 4, 2, 64, jnp.bfloat16),
]


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("causal,hq,hkv,d,dtype", CASES)
def test_outputs_and_gradients_match_xla(backend, causal, hq, hkv, d, dtype, rng):
    q, k, v, seg = inputs(rng, hq, hkv, d, dtype)
    cot = jnp.asarray(rng.normal(size=q.shape), dtype)
    got = outputs_and_grads(lambda q, k, v: run_kernel(backend, q, k, v, seg, causal), q, k, v, cot)
    # The oracle runs in fp32 from the same (rounded) inputs; bf16 kernels are compared loosely.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = outputs_and_grads(lambda q, k, v: attention(q, k, v, seg, seg, causal=causal, impl="xla"),
                             *f32, cot.astype(jnp.float32))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == jnp.float32 else {"rtol": 3e-2, "atol": 3e-2}
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype, name
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w)
        assert np.abs(w).max() > 1e-2, f"{name}: oracle is ~zero, the comparison would prove nothing"
        scale = np.abs(w).max()  # bf16 errors grow with magnitude: compare relative to the tensor's size
        np.testing.assert_allclose(g / scale, w / scale, **tol, err_msg=name)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_does_not_ignore_segments(backend, rng):
    q, k, v, seg = inputs(rng, 2, 1, 64, jnp.float32, b=1)
    merged = jnp.where(seg > 0, 1, 0)  # the same rows with all documents merged into one
    got = np.asarray(run_kernel(backend, q, k, v, seg, True))
    segmented = np.asarray(attention(q, k, v, seg, seg, causal=True))
    unsegmented = np.asarray(attention(q, k, v, merged, merged, causal=True))
    np.testing.assert_allclose(got, segmented, rtol=1e-5, atol=1e-5)
    assert np.abs(segmented - unsegmented).max() > 1e-2  # segments matter for this input ...
    assert np.abs(got - unsegmented).max() > 1e-2  # ... and the kernel honours them


def test_image_attention_is_block_diagonal(rng):
    """Bidirectional with segment ids = vision attention over packed images: each image sees only itself."""
    q, k, v, seg = inputs(rng, 2, 2, 64, jnp.float32, b=1)
    got = np.asarray(run_kernel("gpu", q, k, v, seg, False))
    image1 = np.asarray(seg[0] == 1)
    # Perturb image 1's keys only, with noise (a constant shift would cancel in the softmax).
    k2 = k.at[:, image1].add(jnp.asarray(rng.normal(size=k[:, image1].shape), k.dtype))
    changed = np.asarray(run_kernel("gpu", q, k2, v, seg, False))
    other = np.asarray(seg[0] > 1)
    np.testing.assert_allclose(changed[:, other], got[:, other], rtol=1e-6, atol=1e-6)
    assert np.abs(changed[:, image1] - got[:, image1]).max() > 1e-3


def test_entry_point_shards_the_kernel_over_a_mesh(rng):
    """Under jit with a mesh in context the kernel runs per device in shard_map (rows x heads)."""
    from apriel_jax.parallel.mesh import make_mesh

    q, k, v, seg = inputs(rng, 4, 2, 64, jnp.float32, b=4, s=32)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v, s: attention(q, k, v, s, s, causal=True, impl="pallas_tpu"))
        lowered = fn.lower(q, k, v, seg).as_text()
        got = np.asarray(fn(q, k, v, seg))
    assert "shard_map" in lowered or "sdy.manual_computation" in lowered
    want = np.asarray(attention(q, k, v, seg, seg, causal=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_decoding_falls_back_to_xla_and_windows_are_refused(rng):
    q, k, v, seg = inputs(rng, 4, 2, 64, jnp.float32, b=1, s=16)
    # KV-cache decoding (one query against the cache, q_offset != 0) runs the xla path for any impl.
    got = attention(q[:, -1:], k, v, seg[:, -1:], seg, causal=True, impl="pallas", q_offset=15)
    want = attention(q[:, -1:], k, v, seg[:, -1:], seg, causal=True, impl="xla", q_offset=15)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="sliding_window"):
        attention(q, k, v, seg, seg, causal=True, impl="pallas", sliding_window=4)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention_tpu(q[..., :48], k[..., :48], v[..., :48], seg, seg, causal=True)


def test_auto_and_baseline_choices_on_cpu(rng):
    q, k, v, seg = inputs(rng, 4, 2, 64, jnp.bfloat16, b=1, s=16)
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto", q, k) == "xla_blocked"  # plain XLA that skips fully masked causal blocks
    assert resolve_impl("pallas", q, k) == "pallas_gpu"  # off TPU the Triton kernel (interpret here)
    with pytest.raises(ValueError, match="head_dim"):  # jax's splash kernel cannot do the vision tower
        attention(q, k, v, seg, seg, causal=False, impl="splash")
    with pytest.raises(ValueError, match="GPU"):
        attention(q, k, v, seg, seg, causal=True, impl="cudnn")


def test_tiny_model_logits_match_with_pallas():
    from flax import nnx
    from test_model import random_batch

    from apriel_jax.model import create_model, get_preset

    cfg = get_preset("tiny")
    batch = random_batch(cfg, np.random.default_rng(0))
    batch["segment_ids"][:, 30:] = 2  # a second document in every row
    logits = {}
    for impl in ("xla", "pallas"):
        cfg.attention_impl = impl
        model = create_model(cfg, seed=3)
        logits[impl] = np.asarray(nnx.jit(lambda m, b: m(b))(model, batch))
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=2e-5, atol=2e-5)


def test_triton_kernels_lower_for_cuda_on_this_host():
    """The GPU kernels (forward, dq, dk/dv) lower to Triton without a GPU: catches lowering-only errors
    that interpret mode cannot see (e.g. unsupported ops or non-power-of-two tiles)."""
    b, s, hq, hkv, d = 2, 1000, 8, 2, 128
    q = jax.ShapeDtypeStruct((b, s, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, s), jnp.int32)

    def grads(q, k, v, seg):
        def loss(q, k, v):
            return flash_attention_gpu(q, k, v, seg, seg, causal=True, interpret=False).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = jax.jit(grads).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3


def test_splash_baseline_matches_xla(rng):
    """jax's splash kernel (interpret mode here) behind our entry point: padding, GQA, segments, grads."""
    q, k, v, seg = inputs(rng, 2, 1, 128, jnp.float32, b=1, s=100)
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    got = outputs_and_grads(lambda q, k, v: attention(q, k, v, seg, seg, causal=True, impl="splash"), q, k, v, cot)
    want = outputs_and_grads(lambda q, k, v: attention(q, k, v, seg, seg, causal=True), q, k, v, cot)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4, err_msg=name)
