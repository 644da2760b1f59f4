"""Model structure: presets, sharded creation, static shapes, remat, RoPE layout."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apriel_jax.model import abstract_model, create_model, get_preset, param_count, state_shardings
from apriel_jax.model.rope import pixtral_angles
from apriel_jax.parallel.mesh import make_mesh


def test_big_preset_parameter_counts():
    # Counted on abstract shapes (jax.eval_shape): no memory is allocated.
    assert param_count(get_preset("pixtral_12b")) == 12_682_739_712
    assert param_count(get_preset("apriel_15b")) == 14_863_859_712


def random_batch(cfg, rng, image_grids=((2, 3), (1, 2)), b=2, s=40, p=12):
    """Rows with text and images of the given patch grids; padding patches point out of range."""
    tokens = rng.integers(20, cfg.decoder.vocab_size, (b, s)).astype(np.int32)
    patches = rng.normal(size=(b, p, 768)).astype(np.float32)
    ppos = np.zeros((b, p, 2), np.int32)
    pseg = np.zeros((b, p), np.int32)
    pidx = np.full((b, p), s, np.int32)
    for row in range(b):
        n, slot = 0, 3
        for img, (h, w) in enumerate(image_grids, start=1):
            for r in range(h):
                for c in range(w):
                    ppos[row, n] = (r, c)
                    pseg[row, n] = img
                    pidx[row, n] = slot
                    tokens[row, slot] = cfg.image_token_id
                    n, slot = n + 1, slot + 1
                slot += 1  # [IMG_BREAK] / [IMG_END]
    return dict(
        tokens=tokens, positions=np.tile(np.arange(s, dtype=np.int32), (b, 1)),
        segment_ids=np.ones((b, s), np.int32), patches=patches, patch_positions=ppos,
        patch_segment_ids=pseg, patch_token_index=pidx,
    )


def test_sharded_model_gives_the_same_logits():
    cfg = get_preset("tiny")
    single = create_model(cfg, seed=3)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded = create_model(cfg, seed=3, mesh=mesh)
    state = nnx.state(sharded)
    q_kernel = state["decoder"]["layers"]["attn"]["q"]["kernel"][...]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q_kernel.addressable_shards) == 8
    batch = random_batch(cfg, np.random.default_rng(0))
    want = np.asarray(nnx.jit(lambda m, b: m(b))(single, batch))
    got = np.asarray(nnx.jit(lambda m, b: m(b))(sharded, batch))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_mesh_that_does_not_divide_heads_is_a_clear_error():
    cfg = get_preset("tiny")  # 2 kv heads
    with pytest.raises(ValueError, match="kv|does not divide"):
        state_shardings(cfg, make_mesh({"tensor": 4, "fsdp": 2}))


def test_new_image_sizes_do_not_recompile():
    cfg = get_preset("tiny")
    model = create_model(cfg)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, b: nnx.merge(graphdef, st)(b))
    rng = np.random.default_rng(1)
    for grids in (((2, 3), (1, 2)), ((3, 3),), ((1, 1), (2, 2), (1, 4))):
        forward(state, random_batch(cfg, rng, grids))
    assert forward._cache_size() == 1


def test_remat_policies_change_nothing_numerically():
    batch = random_batch(get_preset("tiny"), np.random.default_rng(2), b=1, s=24, p=8,
                         image_grids=((2, 2),))
    results = {}
    cfg = get_preset("tiny")
    cfg.decoder.num_layers = 4
    cfg.attention_impl = "xla_blocked"  # the kernel that names the residuals the "attention" policy keeps
    state = nnx.state(create_model(cfg, seed=0))  # the policies share parameters: initialised once
    # "full/2": nested remat over groups of 2 decoder layers (4 layers here, so two groups). The "dots"
    # policies are JAX's own, wired by the same name lookup as these.
    for policy in ("none", "full", "full/2", "attention"):
        cfg.remat_policy, _, group = policy.partition("/")
        cfg.remat_group = int(group or 1)
        graphdef = nnx.graphdef(abstract_model(cfg))
        loss = lambda st: nnx.merge(graphdef, st)(batch).mean()  # noqa: B023 - called within the iteration
        results[policy] = jax.jit(jax.value_and_grad(loss))(state)
    l0, g0 = results.pop("none")
    for l1, g1 in results.values():
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _count_primitive(jaxpr, name: str) -> int:
    """Equations of primitive ``name`` in a closed jaxpr, nested calls, scans and remat included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _count_primitive(sub, name)
    return total


def test_attention_remat_policy_skips_the_attention_forward_in_the_backward_pass():
    """Under "full" the backward pass of a layer reruns attention's forward (one more exp over the scores
    per query block); under "attention" the decoder reuses its saved output and log-sum-exp. The vision
    tower attends bidirectionally through ``xla``, which names nothing, so it still recomputes its softmax."""
    cfg = get_preset("tiny")
    cfg.attention_impl = "xla_blocked"
    batch = random_batch(cfg, np.random.default_rng(3), b=1, s=24, p=8, image_grids=((2, 2),))
    state = nnx.state(create_model(cfg, seed=0))
    exps = {}
    for policy in ("none", "full", "attention"):
        cfg.remat_policy = policy
        graphdef = nnx.graphdef(abstract_model(cfg))
        loss = lambda st: nnx.merge(graphdef, st)(batch).mean()  # noqa: B023 - traced within the iteration
        exps[policy] = _count_primitive(jax.make_jaxpr(jax.grad(loss))(state).jaxpr, "exp")
    # 24 tokens are one query block: one exp in the decoder's attention forward, one in the vision tower's
    assert exps["full"] - exps["attention"] == 1 and exps["attention"] - exps["none"] == 1, exps


def test_pixtral_2d_rope_layout():
    """Even base frequencies rotate with the row, odd ones with the column (HF/mistral layout)."""
    d, theta = 16, 10_000.0
    angles = np.asarray(pixtral_angles(jnp.asarray([[3, 5]]), d, theta))[0]
    base = 1.0 / theta ** (np.arange(0, d, 2) / d)
    np.testing.assert_allclose(angles[: d // 4], 3 * base[0::2], rtol=1e-6)
    np.testing.assert_allclose(angles[d // 4:], 5 * base[1::2], rtol=1e-6)


def test_invalid_config_is_rejected():
    cfg = get_preset("tiny")
    cfg.decoder.num_kv_heads = 3
    cfg.vision.hidden_act = "swish2"
    with pytest.raises(ValueError) as err:
        create_model(cfg)
    assert "num_kv_heads" in str(err.value) and "swish2" in str(err.value)
    cfg = get_preset("tiny")
    cfg.remat_group = 3
    with pytest.raises(ValueError, match="remat_group=3 must be >= 1 and divide decoder.num_layers=2"):
        create_model(cfg)


def test_bfloat16_compute_with_fp32_master_weights():
    batch = random_batch(get_preset("tiny"), np.random.default_rng(4))
    cfg32 = get_preset("tiny")
    cfg16 = get_preset("tiny")
    cfg16.dtype = "bfloat16"  # compute; parameters stay fp32
    fp32 = np.asarray(create_model(cfg32, seed=5)(batch))
    model16 = create_model(cfg16, seed=5)
    assert model16.decoder.embed[...].dtype == jnp.float32
    bf16 = np.asarray(model16(batch))
    assert bf16.dtype == np.float32  # logits are returned in fp32
    assert np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.9
