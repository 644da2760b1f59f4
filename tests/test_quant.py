"""Weight-only quantization of the frozen base (apriel_jax/model/quant.py): error bounds, the quantized matmul,
the int8 embedding and LM head (and the chunked loss through it) against the plain model on the dequantized
weights, frozen leaves (no gradient, no optimizer
state), LoRA on a quantized base (train, save, resume, PEFT export), loading quantized from HF and orbax
checkpoints, refusals, and greedy decoding agreement with the full-precision model."""

import functools
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import apriel_jax
from apriel_jax.checkpoint.hf_export import export_hf
from apriel_jax.checkpoint.orbax_io import save_model
from apriel_jax.checkpoint.peft_adapters import export_peft, load_peft
from apriel_jax.model import AprielModel, create_model, get_preset
from apriel_jax.model.factory import abstract_model, adapted_model, model_from_state, param_path, quantized_model
from apriel_jax.model.generate import SamplingConfig, generate
from apriel_jax.model.lora import lora_config, split_adapters
from apriel_jax.model.quant import Int8Head, dequantize, quantize, quantize_embedding, quantized_matmul, weight_bytes, \
    with_quant, without_quant
from apriel_jax.train.optimizer import split_trainable, trainable_for_step

GROUP = 16  # divides the tiny model's widths (64, 128) and head_dim (32)


def _flat(model) -> dict:
    return {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("shape, in_axes", [((256, 96), 1), ((4, 32, 48), 2)])
def test_round_trip_error_is_within_half_a_step(shape, in_axes):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0, shape[-1]).astype(np.float32)
    w.reshape(-1)[7] = 40.0  # an outlier: it only widens its own channel's / group's step
    for mode, bits in (("int8", 127), ("int4", 7)):
        q, s = quantize(jnp.asarray(w), in_axes, mode, GROUP)
        assert q.dtype == (jnp.int8 if mode == "int8" else jnp.int4)
        assert s.dtype == (jnp.float32 if mode == "int8" else jnp.bfloat16)
        values = np.asarray(q).astype(np.int32)
        assert values.min() >= -bits and values.max() <= bits and values.max() == bits
        deq = np.asarray(dequantize(q, s, in_axes, mode))
        if mode == "int8":  # one scale per output channel
            assert s.shape == shape[in_axes:]
            step = np.broadcast_to(np.asarray(s), shape)
        else:  # one scale per group of GROUP along the last input axis, per output
            assert s.shape == (*shape[:in_axes - 1], shape[in_axes - 1] // GROUP, *shape[in_axes:])
            step = np.repeat(np.asarray(s, np.float32), GROUP, axis=in_axes - 1)
        err = np.abs(w - deq)
        assert np.all(err <= step / 2 * (1 + 1e-6)), f"{mode}: worst error / step {np.max(err / step):.4f}"
        assert err.max() > step.max() / 100  # real rounding happened
    zero = quantize(jnp.zeros((32, 8)), 1, "int4", GROUP)
    assert np.all(np.asarray(zero[0]).astype(int) == 0) and np.all(np.asarray(zero[1], np.float32) == 1.0)


def test_an_embedding_table_rounds_per_row_within_half_a_step():
    rng = np.random.default_rng(4)
    table = rng.standard_normal((200, 48)).astype(np.float32) * rng.uniform(0.01, 2.0, (200, 1)).astype(np.float32)
    q, s = quantize_embedding(jnp.asarray(table))
    assert q.dtype == jnp.int8 and q.shape == table.shape and s.dtype == jnp.float32 and s.shape == (200,)
    assert np.all(np.abs(np.asarray(q)).max(axis=1) == 127)  # every row uses its whole range
    step = np.asarray(s)[:, None]
    err = np.abs(table - np.asarray(q, np.float32) * step)
    assert np.all(err <= step / 2 * (1 + 1e-6)) and err.max() > step.max() / 100


def _dequantized_plain(model):
    """The plain model whose quantized weights are the quantized model's dequantized ones (fp32)."""
    cfg = without_quant(model.config.as_configdict())
    mode = model.config.quant.mode
    values = _flat(model)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg))):
        name = param_path(path)
        owner = name.removesuffix("/kernel")
        q, s = values.get(f"{owner}/qkernel"), values.get(f"{owner}/qscale")
        if q is None:
            value = values[name]
        elif owner == "decoder/embed":  # int8 rows, one scale per row
            value = q.astype(jnp.float32) * s[:, None]
        elif owner == "decoder/lm_head":  # int8, one scale per vocabulary column
            value = dequantize(q, s, 1, "int8")
        else:
            n = 2 if owner.endswith("attn/o") else 1
            value = jax.vmap(lambda q, s: dequantize(q, s, n, mode))(q, s)
        flat.append((path, var.replace(value)))
    return model_from_state(cfg, nnx.from_flat_state(flat))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, batch):
    return nnx.merge(graphdef, state)(batch)


def _logits(model, batch):
    return np.asarray(_forward(nnx.graphdef(model), nnx.state(model), batch))


def _batch(rows=2, seq=12, seed=0, vocab=1024):
    tokens = np.random.default_rng(seed).integers(20, vocab, (rows, seq)).astype(np.int32)
    return dict(tokens=jnp.asarray(tokens), positions=jnp.tile(jnp.arange(seq), (rows, 1)),
                segment_ids=jnp.ones((rows, seq), jnp.int32))


@pytest.mark.parametrize("mode, embeddings", [("int8", False), ("int4", False), ("int4", True)])
def test_quantized_matmul_equals_the_plain_model_on_dequantized_weights(mode, embeddings):
    model = AprielModel(with_quant(get_preset("tiny"), mode, GROUP, embeddings), rngs=nnx.Rngs(1))
    kinds = {type(v).__name__ for p, v in nnx.to_flat_state(nnx.state(model))
             if param_path(p).endswith(("qkernel", "qscale"))}
    assert kinds == {"QuantizedWeight"}
    quantized = {n.removesuffix("/qkernel") for n in _flat(model) if n.endswith("qkernel")}
    assert len(quantized) == 7 + 2 * embeddings
    assert ({"decoder/embed", "decoder/lm_head"} <= quantized) == embeddings
    batch = _batch()
    ours, plain = _logits(model, batch), _logits(_dequantized_plain(model), batch)
    err = np.abs(ours - plain).max() / np.abs(plain).max()
    assert err < 1e-5, f"{mode}: relative logits error {err:.2e}"


def test_the_chunked_loss_through_an_int8_head_equals_the_dequantized_head():
    """Loss, z-loss and the hidden states' gradient through an ``Int8Head`` (converted chunk by chunk)
    equal those through its dequantized fp32 kernel; the frozen head gets no gradient."""
    from apriel_jax.train.loss import chunked_cross_entropy

    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.standard_normal((2, 20, 32)), jnp.float32)
    q, s = quantize(jnp.asarray(rng.standard_normal((32, 300)) * 0.3, jnp.float32), 1, "int8")
    head, plain = Int8Head(q, s), dequantize(q, s, 1, "int8")
    targets = jnp.asarray(rng.integers(0, 300, (2, 20)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 20)), jnp.float32)

    def total(h, kernel):
        loss, count, z = chunked_cross_entropy(h, kernel, targets, mask, chunk_size=8, z_loss_weight=1e-2)
        return loss + z, (loss, z)

    (ours, (loss, z)), d_ours = jax.value_and_grad(total, has_aux=True)(hidden, head)
    (ref, (ref_loss, ref_z)), d_ref = jax.value_and_grad(total, has_aux=True)(hidden, plain)
    np.testing.assert_allclose([loss, z], [ref_loss, ref_z], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(d_ours), np.asarray(d_ref), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(d_ref)).max() > 1e-3


@pytest.mark.parametrize("mode, in_axes", [("int8", 1), ("int4", 1), ("int4", 2)])
def test_the_custom_vjp_gives_the_input_gradient_of_the_dequantized_matmul(mode, in_axes):
    shape = (64, 48) if in_axes == 1 else (4, 32, 48)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    q, s = quantize(w, in_axes, mode, GROUP)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, *shape[:in_axes])), jnp.float32)
    target = jnp.asarray(np.random.default_rng(3).standard_normal((3, 48)), jnp.float32)

    def loss(x, matmul):
        return jnp.sum(jnp.tanh(matmul(x)) * target)

    deq = dequantize(q, s, in_axes, mode)
    ours = jax.grad(loss)(x, lambda x: quantized_matmul(x, q, s, mode, in_axes))
    plain = jax.grad(loss)(x, lambda x: jnp.tensordot(x, deq, in_axes))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ training


def _flat_tree(tree) -> dict:
    return {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_quantized_weights_cannot_be_trained_without_lora():
    from apriel_jax.train.config import train_config, validate_train_config

    state = nnx.state(abstract_model(with_quant(get_preset("tiny"), "int8")))
    with pytest.raises(ValueError, match=r"includes quantized weights \(14 leaves.*frozen: train LoRA adapters"):
        split_trainable(state, trainable_for_step(("all",), 0))
    with pytest.raises(ValueError, match="includes quantized weights"):
        split_trainable(state, ("decoder",))
    trainable, _ = split_trainable(state, ("embeddings",))  # the quantized layers left out: fine
    assert set(_flat_tree(trainable)) == {"decoder/embed", "decoder/lm_head/kernel"}
    with_tables = nnx.state(abstract_model(with_quant(get_preset("tiny"), "int8", embeddings=True)))
    with pytest.raises(ValueError, match=r"includes quantized weights \(4 leaves, e.g. 'decoder/embed/qkernel'"):
        split_trainable(with_tables, ("embeddings",))

    cfg = train_config()
    cfg.quant.mode = "int4"
    with pytest.raises(ValueError, match=r"quant.mode='int4' freezes the quantized weights, but trainable=\('all',\)"):
        validate_train_config(cfg)
    cfg.lora.rank = 4
    validate_train_config(cfg)
    cfg.lora.rank, cfg.quant.embeddings, cfg.trainable = 0, True, ("vision", "embeddings")
    with pytest.raises(ValueError, match=r"trains them \(e.g. decoder/embed/qkernel\)"):
        validate_train_config(cfg)


def test_bad_quant_settings_are_refused():
    with pytest.raises(ValueError, match=r"quant.group_size=48 does not divide the input axis of q_proj \(64\)"):
        create_model(with_quant(get_preset("tiny"), "int4", 48))
    with pytest.raises(ValueError, match=r"quant.mode='int3' is not one of"):
        create_model(with_quant(get_preset("tiny"), "int3"))
    with pytest.raises(ValueError, match=r"quant='fp8' is not one of"):
        apriel_jax.from_pretrained(_dirs()["orbax"], quant="fp8")


# ------------------------------------------------------------------------------------------ checkpoints

_CACHE: dict = {}


def _dirs():
    """A tiny fp32 model saved as an apriel-jax directory and as an HF checkpoint (built once)."""
    if not _CACHE:
        import tempfile

        root = tempfile.mkdtemp(prefix="apriel-quant-test-")
        model = create_model(get_preset("tiny"), seed=3)
        _CACHE.update(model=model, root=root, orbax=f"{root}/orbax", hf=f"{root}/hf")
        save_model(nnx.state(model), model.config.as_configdict(), _CACHE["orbax"])
        export_hf(nnx.state(model), model.config.as_configdict(), _CACHE["hf"])
    return _CACHE


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    if _CACHE:
        shutil.rmtree(_CACHE["root"], ignore_errors=True)


@pytest.mark.parametrize("mode, embeddings", [("int8", False), ("int4", True)])
def test_loading_quantized_equals_quantizing_in_memory_and_saves_back(mode, embeddings, tmp_path):
    dirs = _dirs()
    expected = _flat(quantized_model(dirs["model"], mode, GROUP, embeddings))
    assert ("decoder/embed/qkernel" in expected) == embeddings
    for source in ("hf", "orbax"):
        loaded = apriel_jax.from_pretrained(dirs[source], quant=mode, group_size=GROUP, quant_embeddings=embeddings)
        assert loaded.config.quant.to_dict() == {"mode": mode, "group_size": GROUP, "embeddings": embeddings}
        got = _flat(loaded)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name].dtype == expected[name].dtype, name
            np.testing.assert_array_equal(np.asarray(got[name], np.float32), np.asarray(expected[name], np.float32),
                                          err_msg=f"{source}: {name}")
    # A quantized model directory round-trips through orbax (int4 included) and loads quantized as stored.
    save_model(nnx.state(loaded), loaded.config.as_configdict(), tmp_path / "q")
    back = apriel_jax.from_pretrained(tmp_path / "q")
    for name, value in _flat(back).items():
        assert value.dtype == expected[name].dtype
        np.testing.assert_array_equal(np.asarray(value, np.float32), np.asarray(expected[name], np.float32))
    with pytest.raises(ValueError, match=f"stored quantized \\({mode}, group size {GROUP}, embeddings {embeddings}\\); "
                                         "it loads only as stored"):
        apriel_jax.from_pretrained(tmp_path / "q", quant="none")
    with pytest.raises(ValueError, match="it loads only as stored"):
        apriel_jax.from_pretrained(tmp_path / "q", quant=mode, group_size=GROUP, quant_embeddings=not embeddings)
    b = weight_bytes(nnx.state(back))
    plain = weight_bytes(nnx.state(dirs["model"]))
    assert plain["quantized"] == 0 and b["other"] < plain["other"]


def test_adapters_on_a_quantized_base_export_as_peft_and_refuse_a_merged_export(tmp_path):
    dirs = _dirs()
    base = apriel_jax.from_pretrained(dirs["hf"], quant="int4", group_size=GROUP)
    adapted = adapted_model(base, lora_config(rank=4), seed=1)
    adapted = nnx.merge(nnx.graphdef(adapted), jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if param_path(p).endswith("lora_b") else x, nnx.state(adapted)))
    batch = _batch()
    assert np.abs(_logits(adapted, batch) - _logits(base, batch)).max() > 1e-3
    export_peft(nnx.state(adapted), adapted.config.as_configdict(), tmp_path / "peft")
    back = load_peft(tmp_path / "peft", base)
    jax.tree.map(np.testing.assert_array_equal, split_adapters(nnx.state(back))[0], split_adapters(nnx.state(adapted))[0])
    with pytest.raises(ValueError, match=r"quantized \(int4\): an HF export would write the rounded weights"):
        export_hf(nnx.state(adapted), adapted.config.as_configdict(), tmp_path / "hf")
    from apriel_jax.model.factory import merged_model

    with pytest.raises(ValueError, match="cannot fold LoRA adapters into int4 kernels"):
        merged_model(adapted)


@pytest.mark.slow  # ~45 s of CPU (two sharded train runs, four loads of the quantized base): `make test-slow`
def test_quantized_lora_run_trains_adapters_only_and_resumes_bit_identically(tmp_path):
    """A LoRA run (8-way sharded) on an int4 base with int8 embedding and LM head read from an orbax
    checkpoint: only the adapters have gradients and Adam moments, the quantized base comes back from its
    checkpoints unchanged, and a run resumed from an earlier checkpoint ends with the same adapters, bit for
    bit."""
    from apriel_jax.train.config import train_config
    from apriel_jax.train.loop import setup, train

    cfg = train_config()
    cfg.run_dir = str(tmp_path / "run")
    cfg.init.from_pretrained = _dirs()["orbax"]
    cfg.quant.mode, cfg.quant.group_size, cfg.quant.embeddings = "int4", GROUP, True
    cfg.lora.rank, cfg.lora.dropout = 4, 0.1
    cfg.steps, cfg.data.seq_len, cfg.data.global_batch = 4, 32, 8
    cfg.checkpoint.save_every, cfg.checkpoint.keep_last, cfg.checkpoint.async_save = 2, 5, False
    cfg.log.console = cfg.log.tensorboard = False
    cfg.optimizer.peak_lr = 1e-2

    def final_state():
        run = setup(cfg)
        run.ckpt.close()
        return jax.device_get(run.state)

    assert train(cfg)["status"] == "completed"
    done = final_state()
    params, frozen = _flat_tree(done.params), _flat_tree(done.frozen)
    assert len(params) == 14 and all(n.endswith(("lora_a", "lora_b")) for n in params)
    moments = [x for x in jax.tree.leaves(done.opt_state) if x.ndim]
    assert len(moments) == 2 * len(params)  # Adam's mu and nu, for the adapters alone
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in params.values())
    assert all(np.any(params[n] != 0) for n in params if n.endswith("lora_b"))  # trained (B starts at zero)
    # The frozen quantized base came back from the checkpoint as it was quantized at load.
    base = _flat(quantized_model(_dirs()["model"], "int4", GROUP, embeddings=True))
    assert frozen["decoder/layers/mlp/gate/qkernel"].dtype == jnp.int4
    assert frozen["decoder/embed/qkernel"].dtype == frozen["decoder/lm_head/qkernel"].dtype == jnp.int8
    assert len([n for n in frozen if n.endswith(("qkernel", "qscale"))]) == 18
    for name, value in frozen.items():
        np.testing.assert_array_equal(np.asarray(value, np.float32), np.asarray(base[name], np.float32), err_msg=name)

    checkpoints = tmp_path / "run" / "checkpoints"
    assert {2, 4} <= {int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()}
    shutil.rmtree(checkpoints / "4")
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["start_step"] == 2
    resumed = _flat_tree(final_state().params)
    for name in params:
        np.testing.assert_array_equal(resumed[name], params[name], err_msg=name)


# ------------------------------------------------------------------------------------------ decoding


def _pattern_batch(rng, rows, seq):
    """Rows that count up by a per-row stride from a random start (mod 200): learnable in ~200 steps."""
    start, stride = rng.integers(0, 200, (rows, 1)), rng.integers(1, 4, (rows, 1))
    tokens = (20 + (start + stride * np.arange(seq + 1)) % 200).astype(np.int32)
    return tokens


def _briefly_trained_tiny_model(steps: int = 200):
    """The tiny model after ``steps`` Adam steps of next-token prediction on counting rows (a plain jitted
    loop: the full train step's sharding and loss chunking are not what this test is about)."""
    model = AprielModel(get_preset("tiny"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, tokens):
        def loss(params):
            batch = dict(tokens=tokens[:, :-1], positions=jnp.tile(jnp.arange(tokens.shape[1] - 1), (tokens.shape[0], 1)),
                         segment_ids=jnp.ones_like(tokens[:, :-1]))
            logits = nnx.merge(graphdef, params)(batch)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, _pattern_batch(rng, 8, 32))
    return nnx.merge(graphdef, params), float(loss)


def test_greedy_decoding_with_a_quantized_base_agrees_with_full_precision():
    trained, loss = _briefly_trained_tiny_model()
    assert loss < 1.0, loss  # the first tokens of a row (its start and stride) are guesses
    prompts = _pattern_batch(np.random.default_rng(1), 16, 8)[:, :8]
    batch = dict(tokens=prompts, positions=np.tile(np.arange(8, dtype=np.int32), (16, 1)),
                 segment_ids=np.ones((16, 8), np.int32))
    sampling = SamplingConfig(max_new_tokens=24)
    reference = np.asarray(generate(trained, batch, sampling)[0])
    agreement = {}
    for mode, embeddings in (("int8", False), ("int8", True), ("int4", False), ("int4", True)):
        tokens = np.asarray(generate(quantized_model(trained, mode, GROUP, embeddings), batch, sampling)[0])
        agreement[mode + "+embeddings" * embeddings] = float(np.mean(tokens == reference))
    print(f"greedy token agreement with fp32 over {reference.size} tokens (train loss {loss:.3f}): {agreement}")
    assert agreement["int8"] >= 0.95 and agreement["int8+embeddings"] >= 0.95, agreement
    # measured, not bounds to defend: see the printed figures
    assert agreement["int4"] >= 0.5 and agreement["int4+embeddings"] >= 0.5, agreement


# ------------------------------------------------------------------------------------------ TPU


def test_compiled_tpu_arguments_hold_the_kernels_at_one_and_half_a_byte():
    """A forward pass compiled for one v5e chip: the argument bytes drop from bf16 by the projections' bytes
    (int8: 1 byte per weight + fp32 channel scales; int4: half a byte + bf16 scales per group of 64)."""
    pytest.importorskip("libtpu")
    from jax.sharding import SingleDeviceSharding

    from apriel_jax.parallel.aot import topology_devices

    device = SingleDeviceSharding(topology_devices("v5e:1x1")[0])
    cfg = get_preset("tiny")
    # head_dim 128 as in the 15B: a TPU tile is 128 lanes wide, and int4 values stored grouped ([groups, group,
    # heads, head_dim]) would pad a 64-wide head_dim to 128 in the compiled arguments.
    cfg.decoder.update(hidden_size=512, intermediate_size=2048, num_heads=4, num_kv_heads=2, head_dim=128,
                       vocab_size=512)
    cfg.vision.update(hidden_size=128, intermediate_size=256, num_heads=2)
    cfg.dtype = cfg.param_dtype = "bfloat16"
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in _batch(1, 128).items()}

    def argument_bytes(model_cfg):
        graphdef = nnx.graphdef(abstract_model(model_cfg))
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                             nnx.state(abstract_model(model_cfg)))
        forward = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))
        return forward.trace(state, batch).lower(lowering_platforms=("tpu",)).compile().memory_analysis() \
            .argument_size_in_bytes

    plain, int8, int4 = (argument_bytes(c) for c in (cfg, with_quant(cfg, "int8"), with_quant(cfg, "int4", 64)))
    d = cfg.decoder
    weights = d.num_layers * (d.hidden_size * (d.num_heads + 2 * d.num_kv_heads) * d.head_dim
                              + d.num_heads * d.head_dim * d.hidden_size + 3 * d.hidden_size * d.intermediate_size)
    outputs = d.num_layers * ((d.num_heads + 2 * d.num_kv_heads) * d.head_dim + 3 * d.hidden_size + 2 * d.intermediate_size)
    int8_saved = 2 * weights - (weights + 4 * outputs)  # bf16 -> int8 values + fp32 scales per output channel
    int4_saved = 2 * weights - (weights // 2 + 2 * weights // 64)  # int4 values + bf16 scales per 64
    print(f"v5e:1x1 argument bytes: bf16 {plain}, int8 {int8}, int4 {int4}; projections {weights} weights")
    assert math.isclose(plain - int8, int8_saved, rel_tol=0.03), (plain, int8, int8_saved)
    assert math.isclose(plain - int4, int4_saved, rel_tol=0.03), (plain, int4, int4_saved)
