"""Training: chunked loss, optimizer groups and schedules, the sharded step (accumulation, freezing, guard).

Compiling a train step costs seconds on CPU, so compiled steps are module-scoped fixtures shared by tests;
every test builds its own TrainState because steps donate their input state.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from apriel_jax.model import create_model, get_preset
from apriel_jax.model.factory import param_path
from apriel_jax.parallel.mesh import make_mesh
from apriel_jax.train.loss import chunked_cross_entropy
from apriel_jax.train.optimizer import (
    Optimizer, cosine, linear_decay, make_optimizer, split_trainable, trainable_filter, trainable_for_step,
    weight_decay_mask,
)
from apriel_jax.train.step import init_train_state, make_train_step, single_device_mesh

B, S, P = 8, 32, 8
LR, WD = 1e-3, 0.1


def make_batch(cfg, seed=0, rows=B):
    """Rows of two packed documents; images of 2x2 and 1x2 patches in the first document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, cfg.decoder.vocab_size, (rows, S)).astype(np.int32)
    ppos = np.zeros((rows, P, 2), np.int32)
    pseg = np.zeros((rows, P), np.int32)
    pidx = np.full((rows, P), S, np.int32)
    for row in range(rows):
        n, slot = 0, 3
        for img, (h, w) in enumerate(((2, 2), (1, 2)), start=1):
            for r in range(h):
                for c in range(w):
                    ppos[row, n], pseg[row, n], pidx[row, n] = (r, c), img, slot
                    tokens[row, slot] = cfg.image_token_id
                    n, slot = n + 1, slot + 1
                slot += 1
    split = 20
    positions = np.concatenate([np.arange(split), np.arange(S - split)]).astype(np.int32)
    segment_ids = np.where(np.arange(S) < split, 1, 2).astype(np.int32)
    # Rows count different numbers of tokens, so per-row or per-micro-batch normalisation would differ.
    loss_mask = (rng.random((rows, S)) < np.linspace(0.3, 0.9, rows)[:, None]).astype(np.float32)
    return dict(
        tokens=tokens, targets=rng.integers(0, cfg.decoder.vocab_size, (rows, S)).astype(np.int32),
        loss_mask=loss_mask, segment_ids=np.tile(segment_ids, (rows, 1)),
        positions=np.tile(positions, (rows, 1)),
        patches=rng.normal(size=(rows, P, 768)).astype(np.float32), patch_positions=ppos,
        patch_segment_ids=pseg, patch_token_index=pidx,
    )


def host(tree):
    """Flat {path: numpy array} copy (taken before a donating step frees the buffers)."""
    return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_close(got, want, tol):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=k)


@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    return create_model(cfg, seed=0)


@pytest.fixture(scope="module")
def optimizer():
    return make_optimizer(linear_decay(LR, 100), weight_decay=WD, clip_norm=1.0)


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh({"fsdp": 4, "tensor": 2})


@pytest.fixture(scope="module")
def graphdef(model):
    return nnx.graphdef(model)


@pytest.fixture(scope="module")
def step1(cfg, graphdef, optimizer):
    return make_train_step(cfg, graphdef, optimizer, single_device_mesh(), chunk_size=12)


@pytest.fixture(scope="module")
def step8(cfg, graphdef, optimizer, mesh8):
    return make_train_step(cfg, graphdef, optimizer, mesh8, chunk_size=12)


def run(step, state, batches):
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics


# ------------------------------------------------------------------------------------------- loss


def test_chunked_loss_matches_naive_values_and_gradients():
    rng = np.random.default_rng(0)
    b, s, e, v = 2, 37, 16, 50  # 37 is not a multiple of the chunk
    hidden = jnp.asarray(rng.normal(size=(b, s, e)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(e, v)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    mask = jnp.asarray(rng.random((b, s)) < 0.7, jnp.float32)
    zw = 1e-3

    def naive(h, k):
        logits = h @ k
        lse = jax.nn.logsumexp(logits, -1)
        nll = lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask) + zw * jnp.sum(lse**2 * mask)

    def chunked(h, k):
        loss, count, z = chunked_cross_entropy(h, k, targets, mask, chunk_size=8, z_loss_weight=zw)
        return loss + z

    _, count, z = chunked_cross_entropy(hidden, kernel, targets, mask, chunk_size=8, z_loss_weight=zw)
    assert float(count) == float(mask.sum()) and float(z) > 0
    np.testing.assert_allclose(jax.jit(chunked)(hidden, kernel), naive(hidden, kernel), rtol=1e-6)
    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, kernel)
    want = jax.grad(naive, argnums=(0, 1))(hidden, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    # Memory: the compiled gradient holds one chunk of logits [2, 8, 50] at a time, neither the full
    # [2, 37, 50] nor every chunk's logits stacked as scan residuals [5, 2, 8, 50] (what no remat keeps).
    hlo = jax.jit(jax.grad(chunked, argnums=(0, 1))).lower(hidden, kernel).compile().as_text()
    vocab_shapes = [tuple(map(int, d.split(","))) for d in re.findall(r"f32\[([\d,]+)\]", hlo) if d.endswith(",50")]
    assert vocab_shapes and max(math.prod(d) for d in vocab_shapes) <= b * 8 * v


def test_chunked_loss_on_a_mesh_gathers_the_head_once_and_matches_naive(mesh8):
    """Rows over fsdp, the head over (fsdp, tensor): values and gradients equal the unsharded naive loss,
    and the compiled gradient gathers the head once and reduces its gradient once (no collective on
    the head inside the chunk loops)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from apriel_jax.parallel.collectives import collectives_per_step

    rng = np.random.default_rng(1)
    b, s, e, v = 8, 37, 16, 50
    hidden = jnp.asarray(rng.normal(size=(b, s, e)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(e, v)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    mask = jnp.asarray(rng.random((b, s)) < 0.7, jnp.float32)

    def naive(h, k):
        logits = h @ k
        lse = jax.nn.logsumexp(logits, -1)
        return jnp.sum((lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]) * mask)

    def chunked(h, k):
        return chunked_cross_entropy(h, k, targets, mask, chunk_size=8)[0]

    h8 = jax.device_put(hidden, NamedSharding(mesh8, P("fsdp", None, None)))
    k8 = jax.device_put(kernel, NamedSharding(mesh8, P("fsdp", "tensor")))
    grad = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))
    with jax.set_mesh(mesh8):
        value, got = grad(h8, k8)
        hlo = grad.lower(h8, k8).compile().as_text()
    np.testing.assert_allclose(value, naive(hidden, kernel), rtol=1e-6)
    for g, w in zip(got, jax.grad(naive, argnums=(0, 1))(hidden, kernel)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    head = [op for op in collectives_per_step(hlo).ops if op.shape[-2:] == (e, v // 2) or op.shape == (e, v)]
    assert sorted(op.per_step for op in head) == [1, 1], [(op.kind, op.shape, op.per_step) for op in head]


# ------------------------------------------------------------------------------------- schedules


def test_schedules_at_key_steps():
    lin = linear_decay(1.0, total_steps=100, warmup_steps=10)
    assert [float(lin(t)) for t in (0, 5, 10, 55, 100)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-6)
    assert float(linear_decay(2.0, 10)(0)) == pytest.approx(2.0)
    cos = cosine(1.0, total_steps=100, warmup_fraction=0.1, final_lr_fraction=0.1)
    # Warm-up ends at step 10; the cosine spans steps 10..100, so step 55 is its midpoint.
    assert [float(cos(t)) for t in (0, 10, 55, 100)] == pytest.approx([0.0, 1.0, 0.55, 0.1], abs=1e-6)
    with pytest.raises(ValueError):
        linear_decay(1.0, 10, warmup_steps=10)


# --------------------------------------------------------------------------------- groups / mask


def test_groups_weight_decay_mask_and_typos(model):
    state = nnx.state(model)
    names = lambda tree: {param_path(p) for p, _ in nnx.to_flat_state(tree)}  # noqa: E731
    decoder, _ = split_trainable(state, ["decoder"])
    assert "decoder/norm/scale" in names(decoder) and "decoder/layers/mlp/gate/kernel" in names(decoder)
    assert not names(decoder) & {"decoder/embed", "decoder/lm_head/kernel"}
    emb, _ = split_trainable(state, ["embeddings"])
    assert names(emb) == {"decoder/embed", "decoder/lm_head/kernel"}
    glob, _ = split_trainable(state, ["vision/layers/attn/*"])
    assert names(glob) == {f"vision/layers/attn/{n}/kernel" for n in "qkvo"}
    assert trainable_filter(["projector"])(("projector", "linear_1", "bias"), state["projector"]["linear_1"]["bias"])
    with pytest.raises(ValueError, match="visoin"):
        split_trainable(state, ["visoin"])

    mask = host(weight_decay_mask(state))
    assert not any(mask[k] for k in mask if k.endswith(("/scale", "/bias")))
    assert not mask["decoder/embed"]
    assert mask["decoder/lm_head/kernel"] and mask["vision/layers/attn/q/kernel"]
    assert host(weight_decay_mask(state, decay_embeddings=True))["decoder/embed"]


def test_weight_decay_spares_norms_biases_and_embeddings(cfg, model, optimizer, step1):
    # No counted token: zero gradients, so AdamW's only change is the decoupled decay lr * wd * param.
    _, state = init_train_state(model, optimizer)
    before = host(state.params)
    batch = make_batch(cfg)
    batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
    state, (m,) = run(step1, state, [batch])
    assert m["skipped"] == 0 and m["grad_norm"] == 0 and m["lr"] == pytest.approx(LR)
    after = host(state.params)
    for k in before:
        exempt = k.endswith(("/scale", "/bias")) or k == "decoder/embed"
        want = before[k] if exempt else before[k] * (1 - LR * WD)
        np.testing.assert_allclose(after[k], want, rtol=1e-6, atol=0, err_msg=k)


# ---------------------------------------------------------------------------------- train step


def test_eight_devices_match_one_device(cfg, model, optimizer, step1, step8, mesh8):
    batches = [make_batch(cfg, seed=1), make_batch(cfg, seed=2)]
    _, s1 = init_train_state(model, optimizer)
    _, s8 = init_train_state(model, optimizer, mesh=mesh8)
    q = s8.params["decoder"]["layers"]["attn"]["q"]["kernel"][...]
    assert len(q.addressable_shards) == 8
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    s1, m1 = run(step1, s1, batches)
    s8, m8 = run(step8, s8, batches)
    for a, b in zip(m1, m8):
        for k in ("loss", "grad_norm", "tokens", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert int(s8.step) == 2
    # 8 shards sum the gradients in another order than 1 device; Adam divides by sqrt(nu), so a tiny
    # gradient's rounding can move its parameter by ~1e-5 (seen at LLVM -O0, which the suite compiles at).
    assert_trees_close(host(s8.params), host(s1.params), 2e-5)
    assert_trees_close(host(s8.opt_state), host(s1.opt_state), 1e-5)


def test_gradient_accumulation_equals_one_big_batch(cfg, model, graphdef):
    # Plain SGD with lr 1: the parameter change *is* the gradient. (Adam's first update g / (|g| + eps)
    # turns a 1e-9 rounding difference in a near-zero gradient into a visible parameter difference.)
    sgd = Optimizer(optax.sgd(1.0), optax.constant_schedule(1.0))
    step_big, step_acc = (
        make_train_step(cfg, graphdef, sgd, single_device_mesh(), grad_accum_steps=a, chunk_size=12) for a in (1, 4)
    )
    batches = [make_batch(cfg, seed=3), make_batch(cfg, seed=4)]
    _, big = init_train_state(model, sgd)
    _, acc = init_train_state(model, sgd)
    big, mb = run(step_big, big, batches)
    acc, ma = run(step_acc, acc, batches)
    for a, b in zip(ma, mb):
        for k in ("loss", "grad_norm", "tokens"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k
    assert_trees_close(host(acc.params), host(big.params), 1e-6)


@pytest.mark.parametrize("stage", ["realign", "cpt2"])
def test_frozen_groups_get_no_update_and_no_optimizer_state(cfg, model, graphdef, optimizer, mesh8, stage):
    trainable = ["projector"] if stage == "realign" else ["projector", "decoder", "embeddings"]
    mesh = mesh8 if stage == "realign" else single_device_mesh()
    step = make_train_step(cfg, graphdef, optimizer, mesh, trainable=trainable, chunk_size=12)
    _, state = init_train_state(model, optimizer, mesh=mesh, trainable=trainable)
    trainable_before, frozen_before = host(state.params), host(state.frozen)
    prefixes = ("projector/",) if stage == "realign" else ("projector/", "decoder/")
    assert all(k.startswith(prefixes) for k in trainable_before)
    assert any(k.startswith("vision/") for k in frozen_before)
    n_trainable = sum(v.size for v in trainable_before.values())
    moments = sum(x.size for name in ("mu", "nu")
                  for x in jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, name)))
    assert moments == 2 * n_trainable

    state, (m,) = run(step, state, [make_batch(cfg, seed=5)])
    assert m["skipped"] == 0 and m["grad_norm"] > 0
    frozen_after, trainable_after = host(state.frozen), host(state.params)
    for k, v in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[k], v, err_msg=k)
    assert all(not np.array_equal(trainable_after[k], v) for k, v in trainable_before.items() if "kernel" in k)


def test_text_only_steps_hold_no_state_for_the_image_parts(cfg, model, graphdef, optimizer):
    """A step without images never runs the vision tower or the projector: they are frozen there (no
    optimizer moments, no weight decay) unless images can reach them."""
    text_only = trainable_for_step(("all",), patch_budget=0)
    _, state = init_train_state(model, optimizer, trainable=text_only)
    trained, frozen = host(state.params), host(state.frozen)
    assert trained and all(k.startswith("decoder/") for k in trained)
    assert {k.split("/")[0] for k in frozen} == {"vision", "projector"}
    moments = sum(x.size for name in ("mu", "nu")
                  for x in jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, name)))
    assert moments == 2 * sum(v.size for v in trained.values())
    step = make_train_step(cfg, graphdef, optimizer, single_device_mesh(), trainable=text_only, chunk_size=12)
    text_batch = {k: v for k, v in make_batch(cfg, seed=6).items() if not k.startswith("patch")}
    state, (m,) = run(step, state, [text_batch])
    assert m["skipped"] == 0 and m["grad_norm"] > 0
    for k, v in frozen.items():
        np.testing.assert_array_equal(host(state.frozen)[k], v, err_msg=k)

    assert trainable_for_step(("all",), patch_budget=64) == ("all",)
    with pytest.raises(ValueError, match="never runs the vision tower or the projector"):
        init_train_state(model, optimizer, trainable=trainable_for_step(("projector",), patch_budget=0))


def test_non_finite_loss_skips_the_update(cfg, model, optimizer, step1):
    _, state = init_train_state(model, optimizer)
    params_before, opt_before = host(state.params), host(state.opt_state)
    batch = make_batch(cfg, seed=6)
    batch["patches"][0, 0, :5] = np.inf  # the vision tower turns this into NaN features in row 0
    state, (m,) = run(step1, state, [batch])
    assert m["skipped"] == 1 and not np.isfinite(m["loss"])
    assert int(state.step) == 1
    for got, want in ((host(state.params), params_before), (host(state.opt_state), opt_before)):
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    state, (m,) = run(step1, state, [make_batch(cfg, seed=6)])  # a clean batch trains again
    assert m["skipped"] == 0 and int(state.step) == 2


def test_non_finite_update_from_finite_gradients_is_dropped(cfg, model, graphdef):
    """A NaN learning rate makes a NaN update from finite gradients: the guard must drop it too."""
    nan_lr = make_optimizer(float("nan"), weight_decay=WD, clip_norm=1.0)
    _, state = init_train_state(model, nan_lr)
    step = make_train_step(cfg, graphdef, nan_lr, single_device_mesh(), chunk_size=12)
    params_before = host(state.params)
    state, (m,) = run(step, state, [make_batch(cfg, seed=8)])
    assert m["skipped"] == 1 and np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
    for k, v in host(state.params).items():
        np.testing.assert_array_equal(v, params_before[k], err_msg=k)


def test_indivisible_batch_is_a_clear_error(cfg, model, graphdef, optimizer, step8, mesh8):
    _, state = init_train_state(model, optimizer, mesh=mesh8)
    with pytest.raises(ValueError, match="multiple of 4"):
        step8(state, make_batch(cfg, rows=6))
    accumulating = make_train_step(cfg, graphdef, optimizer, mesh8, grad_accum_steps=4)
    with pytest.raises(ValueError, match="multiple of 16"):
        accumulating(state, make_batch(cfg))


def test_bfloat16_compute_keeps_fp32_master_weights(cfg, graphdef, optimizer):
    bf16 = cfg.copy_and_resolve_references()
    bf16.dtype = "bfloat16"
    with pytest.raises(ValueError, match="graphdef"):  # the fp32 model's graphdef computes in fp32
        make_train_step(bf16, graphdef, optimizer)
    bf16_graphdef, state = init_train_state(create_model(bf16, seed=0), optimizer)
    step = make_train_step(bf16, bf16_graphdef, optimizer, single_device_mesh(), chunk_size=12)
    state, (m,) = run(step, state, [make_batch(bf16, seed=7)])
    assert m["skipped"] == 0 and np.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert all(v.dtype == np.float32 for v in host(state.params).values())
    assert all(v.dtype == np.float32 for v in host(state.opt_state).values() if v.ndim)
