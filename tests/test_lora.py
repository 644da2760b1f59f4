"""LoRA: adapters on the decoder's projections (and the projector), PEFT export/import, merged export, and a
train step that updates the adapters alone.

Parity is with ``peft`` on transformers' LlavaForConditionalGeneration: a tiny random base model with random
(non-zero) adapters, exported in PEFT's layout and loaded by ``PeftModel.from_pretrained``, gives our fp32
logits within 1e-5 relative error; the merged export loaded as a plain HF checkpoint gives them too.
"""

import copy
import json
import signal
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import apriel_jax
import hf_reference as ref
from apriel_jax.checkpoint.hf_export import export_hf
from apriel_jax.checkpoint.peft_adapters import ADAPTER_CONFIG, export_peft, load_peft, read_adapters
from apriel_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from apriel_jax.data import from_hf_inputs
from apriel_jax.model import create_model, get_preset
from apriel_jax.model.factory import abstract_model, adapted_model, merged_model, param_path
from apriel_jax.model.layers import count_params
from apriel_jax.model.lora import TARGETS, lora_config, split_adapters, with_lora
from apriel_jax.parallel.mesh import make_mesh
from apriel_jax.train.config import train_config, validate_train_config
from apriel_jax.train.optimizer import make_optimizer, trainable_for_step, trainable_param_counts
from apriel_jax.train.step import init_train_state, make_train_step

REL_TOL = 1e-5
ROWS = [[(32, 48), (16, 16)], [(48, 32)]]  # two rows, three images of different sizes
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """(HF model, its saved directory, our model loaded from it)."""
    model = ref.make_hf_model(ref.make_hf_config(**ref.TINY_VARIANTS["base"]), seed=7)
    path = ref.save_hf_model(model, tmp_path_factory.mktemp("base"))
    return model, path, apriel_jax.from_pretrained(path)


@pytest.fixture(scope="module")
def inputs():
    return ref.make_inputs(ROWS, vocab_size=1024, seed=3)


def logits(model, inputs):
    batch = from_hf_inputs(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_sizes"),
                           inputs["attention_mask"], image_token_id=model.config.image_token_id)
    return np.asarray(model({k: jnp.asarray(v) for k, v in batch.items()}))


def relative_error(ours, theirs, inputs):
    real = inputs["attention_mask"].astype(bool)
    return float(np.abs(ours - theirs)[real].max() / np.abs(theirs[real]).max())


def randomise_b(model):
    """The model with every B random too (fresh adapters have B = 0, which would hide a wrong A or B)."""
    def draw(path, x):
        if not param_path(path).endswith("lora_b"):
            return x
        return 0.05 * jax.random.normal(jax.random.key(zlib.crc32(param_path(path).encode())), x.shape, x.dtype)

    return nnx.merge(nnx.graphdef(model), jax.tree_util.tree_map_with_path(draw, nnx.state(model)))


@pytest.fixture(scope="module")
def adapted(hf_base):
    """Our base with random rank-4 adapters on every target, the projector's two maps included."""
    _, _, base = hf_base
    lora = lora_config(rank=RANK, alpha=ALPHA, target_modules=list(TARGETS))
    return randomise_b(adapted_model(base, lora, seed=1))


@pytest.fixture(scope="module")
def adapter_dir(adapted, hf_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft") / "adapter"
    export_peft(nnx.state(adapted), adapted.config.as_configdict(), out, base_model_name_or_path=hf_base[1])
    return out


def test_peft_applies_our_adapters_with_our_logits(adapted, adapter_dir, hf_base, inputs):
    from peft import PeftModel

    hf_model, path, _ = hf_base
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        ("LORA", RANK, ALPHA, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), adapter_dir).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    adapted_modules = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted_modules) == 2 * 7 + 2 and not [n for n in adapted_modules if "vision_tower" in n]
    theirs = ref.hf_logits(peft_model, inputs)
    err = relative_error(logits(adapted, inputs), theirs, inputs)
    assert err <= REL_TOL, f"max relative logits error vs peft {err:.2e}"
    # The adapters matter: the base model's logits are far from these.
    assert relative_error(ref.hf_logits(hf_model, inputs), theirs, inputs) > 1e-2


def test_merged_export_equals_adapter_application(adapted, hf_base, inputs, tmp_path):
    _, path, _ = hf_base
    export_hf(nnx.state(adapted), adapted.config.as_configdict(), tmp_path / "merged")
    assert sorted(SafetensorsCheckpoint(tmp_path / "merged").keys()) == sorted(SafetensorsCheckpoint(path).keys())
    merged = ref.load_hf_model(tmp_path / "merged")
    err = relative_error(logits(adapted, inputs), ref.hf_logits(merged, inputs), inputs)
    assert err <= REL_TOL, f"max relative logits error of the merged export {err:.2e}"


def test_exported_adapters_load_back_exactly(adapted, adapter_dir, hf_base, inputs):
    _, _, base = hf_base
    back = load_peft(adapter_dir, base)
    assert back.config.lora.to_dict() == adapted.config.lora.to_dict()
    want = split_adapters(nnx.state(adapted))[0]
    got = split_adapters(nnx.state(back))[0]
    jax.tree.map(np.testing.assert_array_equal, got, want)
    np.testing.assert_array_equal(logits(back, inputs), logits(adapted, inputs))


def test_convert_writes_a_lora_checkpoint_as_peft_adapters_and_merged(adapted, adapter_dir, hf_base, tmp_path,
                                                                        capsys):
    from apriel_jax.checkpoint.orbax_io import save_model
    from apriel_jax.cli import main

    save_model(nnx.state(adapted), adapted.config.as_configdict(), tmp_path / "orbax")
    peft_dir = tmp_path / "peft"
    assert main(["convert", "orbax-to-peft", str(tmp_path / "orbax"), str(peft_dir), "--base", hf_base[1]]) == 0
    for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
        assert (peft_dir / name).read_bytes() == (adapter_dir / name).read_bytes(), name
    assert main(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    merged = apriel_jax.from_pretrained(tmp_path / "hf")
    assert "lora" not in merged.config
    assert main(["convert", "orbax-to-peft", str(tmp_path / "hf"), str(tmp_path / "none")]) == 2  # no adapters

    # `generate --adapter`: the base with the PEFT adapters writes what the merged checkpoint writes.
    import shutil

    base_dir = tmp_path / "base"
    shutil.copytree(hf_base[1], base_dir)
    for folder in (base_dir, tmp_path / "hf"):
        shutil.copy(Path(apriel_jax.__file__).parent / "data" / "demo_data" / "tokenizer.json", folder)
    prompt = ["--prompt", "The house is", "--max-new-tokens", "12"]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), *prompt]) == 0
    merged_text = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(base_dir), "--adapter", str(peft_dir), *prompt]) == 0
    assert capsys.readouterr().out == merged_text
    assert main(["generate", "--checkpoint", str(base_dir), *prompt]) == 0
    assert capsys.readouterr().out != merged_text  # the adapters change what the base writes
    assert main(["generate", "--checkpoint", str(base_dir), "--adapter", str(tmp_path), *prompt]) == 2


def test_adapters_peft_wrote_load_with_peft_logits(hf_base, inputs, tmp_path):
    """The other way: adapters made and saved by peft itself (decoder q/v/down only) read into our model."""
    import torch
    from peft import LoraConfig, get_peft_model

    hf_model, _, base = hf_base
    config = LoraConfig(r=2, lora_alpha=6, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    peft_model = get_peft_model(copy.deepcopy(hf_model), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(tmp_path)
    ours = load_peft(tmp_path, base)
    assert sorted(ours.config.lora.target_modules) == ["down_proj", "q_proj", "v_proj"]
    err = relative_error(logits(ours, inputs), ref.hf_logits(peft_model.eval(), inputs), inputs)
    assert err <= REL_TOL, f"max relative logits error vs peft's own adapters {err:.2e}"


def test_fresh_adapters_leave_the_output_exactly_unchanged(hf_base, inputs):
    _, _, base = hf_base
    fresh = adapted_model(base, lora_config(rank=RANK, target_modules=list(TARGETS)), seed=3)
    a = split_adapters(nnx.state(fresh))[0]
    assert all(np.any(np.asarray(x) != 0) for p, x in jax.tree_util.tree_leaves_with_path(a)
               if param_path(p).endswith("lora_a"))
    np.testing.assert_array_equal(logits(fresh, inputs), logits(base, inputs))


def test_dropout_only_in_training_forward_passes(adapted):
    cfg = adapted.config.as_configdict()
    cfg.lora.dropout = 0.5
    tokens = jnp.asarray(np.random.default_rng(0).integers(20, 1024, (2, 12)), jnp.int32)
    batch = dict(tokens=tokens, positions=jnp.tile(jnp.arange(12), (2, 1)), segment_ids=jnp.ones((2, 12), jnp.int32))

    def forward(graphdef):
        return jax.jit(lambda state, key: nnx.merge(graphdef, state).hidden_states(batch, dropout_key=key)[0])

    plain, with_dropout = forward(nnx.graphdef(adapted)), forward(nnx.graphdef(abstract_model(cfg)))
    state = nnx.state(adapted)
    reference = np.asarray(plain(state, None))
    np.testing.assert_array_equal(np.asarray(with_dropout(state, None)), reference)  # evaluation: no dropout
    dropped = np.asarray(with_dropout(state, jax.random.key(0)))
    assert np.abs(dropped - reference).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(with_dropout(state, jax.random.key(0))), dropped)


def test_generation_with_adapters_equals_the_merged_model_and_never_drops(adapted, inputs):
    """KV-cached greedy decoding through the adapters (dropout configured at 0.5) gives the merged model's
    tokens: generation runs the adapters without dropout."""
    from apriel_jax.model.generate import SamplingConfig, generate

    cfg = adapted.config.as_configdict()
    cfg.lora.dropout = 0.5
    with_dropout = nnx.merge(nnx.graphdef(abstract_model(cfg)), nnx.state(adapted))
    batch = from_hf_inputs(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_sizes"),
                           inputs["attention_mask"], image_token_id=cfg.image_token_id)
    sampling = SamplingConfig(max_new_tokens=8, pad_id=ref.PAD_ID)
    ours, _ = generate(with_dropout, batch, sampling)
    merged, _ = generate(merged_model(adapted), batch, sampling)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(merged))


def _text_batch(cfg, rows=4, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        tokens=rng.integers(20, cfg.decoder.vocab_size, (rows, seq)).astype(np.int32),
        targets=rng.integers(20, cfg.decoder.vocab_size, (rows, seq)).astype(np.int32),
        loss_mask=np.ones((rows, seq), np.float32), segment_ids=np.ones((rows, seq), np.int32),
        positions=np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
    )


def _names(tree) -> set[str]:
    return {param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_train_step_updates_only_the_adapters_and_repeats_bit_identically():
    cfg = with_lora(get_preset("tiny"), lora_config(rank=RANK, dropout=0.1))
    model = create_model(cfg, seed=0)
    trainable = trainable_for_step(("all",), 0, adapters=True)
    optimizer = make_optimizer(1e-2)
    adapter_count = count_params(split_adapters(nnx.state(model, nnx.Param))[0])
    # Per layer: A [in, 4] and B [4, out] of q (64->128), k, v (64->64), o (128->64), gate, up (64->128), down.
    assert trainable_param_counts(cfg, trainable)[0] == adapter_count == 2 * 4 * (192 + 128 + 128 + 4 * 192)
    graphdef, state = init_train_state(model, optimizer, trainable=trainable)
    assert _names(state.params) == {n for n in _names(nnx.state(model)) if n.endswith(("lora_a", "lora_b"))}
    assert len(_names(state.params)) == 2 * 7  # A and B of the 7 decoder projections (stacked over layers)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert len(moments) == 2 * len(_names(state.params))  # Adam's mu and nu, for the adapters only
    assert sum(x.size for x in moments) == 2 * adapter_count
    step = make_train_step(cfg, graphdef, optimizer, trainable=trainable, donate=False)
    batch = _text_batch(cfg)
    new, metrics = step(state, batch)
    assert float(metrics["skipped"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, new.frozen, state.frozen)
    before, after = dict(jax.tree_util.tree_leaves_with_path(state.params)), dict(
        jax.tree_util.tree_leaves_with_path(new.params))
    assert all(np.any(np.asarray(after[k]) != np.asarray(before[k])) for k in before
               if param_path(k).endswith("lora_b"))
    again, _ = step(state, batch)  # the same step (and dropout masks) from the same state: the same result
    jax.tree.map(np.testing.assert_array_equal, again.params, new.params)

    # Sharded (fsdp 4 x tensor 2): A and B shard like their weights, and the update (dropout masks included) is
    # the same.
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    graphdef, sharded = init_train_state(create_model(cfg, seed=0, mesh=mesh), optimizer, mesh=mesh,
                                         trainable=trainable)
    q = sharded.params["decoder"]["layers"]["attn"]["q"]
    q_a, q_b = q["lora_a"][...], q["lora_b"][...]
    assert (tuple(q_a.sharding.spec), tuple(q_b.sharding.spec)) == ((None, "fsdp", None), (None, None, "tensor", None))
    on_mesh, _ = make_train_step(cfg, graphdef, optimizer, mesh, trainable=trainable)(sharded, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), on_mesh.params, new.params)


def test_trainable_parts_select_adapters_within_them():
    cfg = with_lora(get_preset("tiny"), lora_config(rank=RANK, target_modules=["q_proj", "linear_2"]))
    decoder_only, _ = trainable_param_counts(cfg, trainable_for_step(("decoder",), 8, adapters=True))
    both, _ = trainable_param_counts(cfg, trainable_for_step(("all",), 8, adapters=True))
    text_only, _ = trainable_param_counts(cfg, trainable_for_step(("all",), 0, adapters=True))
    q = 2 * (64 * RANK + RANK * 4 * 32)  # two layers of A [64, r] and B [r, 4, 32]
    assert decoder_only == text_only == q and both == q + (64 * RANK + RANK * 64)


# ------------------------------------------------------------------------------------------ bad input


def test_a_target_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no layer"):
        create_model(with_lora(get_preset("tiny"), lora_config(rank=2, target_modules=["q_proj", "qkv_proj"])))
    cfg = train_config()
    cfg.lora.rank, cfg.lora.target_modules = 2, ["self_attn"]
    with pytest.raises(ValueError, match=r"lora.target_modules \['self_attn'\] match no layer"):
        validate_train_config(cfg)


def test_a_rank_wider_than_a_layer_is_refused():
    with pytest.raises(ValueError, match=r"lora.rank=65 is larger than q_proj \(64 -> 128 features\)"):
        create_model(with_lora(get_preset("tiny"), lora_config(rank=65, target_modules=["q_proj"])))


def test_adapters_of_another_base_model_are_refused(adapter_dir, hf_base, tmp_path):
    base_cfg = hf_base[2].config.as_configdict()
    deeper = copy.deepcopy(base_cfg)
    deeper.decoder.num_layers = 3
    with pytest.raises(CheckpointError, match=r"(?s)not made for this base model \(3 decoder layers\).*missing"):
        read_adapters(adapter_dir, deeper)
    wider = copy.deepcopy(base_cfg)
    wider.decoder.intermediate_size = 96
    with pytest.raises(CheckpointError, match=r"(?s)down_proj.lora_A.weight .* has shape \(4, 128\), but the base "
                                              r"model expects \(4, 96\).*different base model"):
        read_adapters(adapter_dir, wider)
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        read_adapters(tmp_path, base_cfg)


# ------------------------------------------------------------------------------------------ train runs


def _lora_run_cfg(run_dir, base_dir):
    from apriel_jax.utils.config_cli import apply_overrides, load_config_file

    return apply_overrides(load_config_file(str(TINY_TEXT)), [*_run_args(base_dir), f"--config.run_dir={run_dir}"])


TINY_TEXT = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_text.py"
RUN_STEPS = 6


def _run_args(base_dir):
    return [f"--config.steps={RUN_STEPS}", "--config.checkpoint.save_every=2", "--config.checkpoint.async_save=false",
            "--config.eval.every=0", "--config.log.tensorboard=false", f"--config.init.from_pretrained={base_dir}",
            "--config.lora.rank=4", "--config.lora.dropout=0.1", "--config.optimizer.peak_lr=1e-2"]


def _logged_steps(run_dir) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_lora_run_killed_and_resumed_is_bit_identical(hf_base, tmp_path):
    """A LoRA run on the HF base (adapters with dropout, text only) killed with SIGKILL mid-run and resumed
    ends with the same adapters, bit for bit, as a run that was never interrupted."""
    from apriel_jax.train.loop import load_params, train

    _, base_dir, _ = hf_base
    reference = _lora_run_cfg(tmp_path / "reference", base_dir)
    reference.log.console = False
    assert train(reference)["status"] == "completed"

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "apriel_jax.cli", "train", str(TINY_TEXT), *_run_args(base_dir),
           f"--config.run_dir={run_dir}"]
    proc = subprocess.Popen([*cmd, "--config.debug.step_sleep_s=0.5"], cwd=TINY_TEXT.parents[2],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while 3 not in _logged_steps(run_dir):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "step 3 not reached in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < RUN_STEPS, saved
    resumed = subprocess.run(cmd, cwd=TINY_TEXT.parents[2], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at step {max(saved)}" in resumed.stdout

    expected, got = load_params(reference), load_params(_lora_run_cfg(run_dir, base_dir))
    assert expected.keys() == got.keys()
    assert all("['lora_a']" in k or "['lora_b']" in k for k in expected), list(expected)  # adapters alone train
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_lora_stage_settings_are_checked():
    from apriel_jax.stages.config import pipeline_config, stage, validate_pipeline

    cfg = pipeline_config()
    cfg.order = ["sft"]
    cfg.stages.sft = stage(init="random")
    cfg.stages.sft.train.lora.rank = 8
    cfg.stages.sft.finalize.kind, cfg.stages.sft.finalize.num_checkpoints = "average", 2
    cfg.stages.sft.train.steps, cfg.stages.sft.train.checkpoint.save_every = 4, 2
    with pytest.raises(ValueError, match="average A and B apart"):
        validate_pipeline(cfg)
    cfg.stages.sft.finalize.kind = "last"
    validate_pipeline(cfg)
    cfg.stages.sft.train.lora.rank = 0
    cfg.export.peft_dir = "/tmp/unused"
    with pytest.raises(ValueError, match="export.peft_dir is set but the last stage 'sft' trains no LoRA"):
        validate_pipeline(cfg)


def test_pipeline_ending_with_a_lora_stage_exports_merged_and_peft(hf_base, inputs, tmp_path):
    """A LoRA SFT stage on the HF base: its summary counts the adapters as the trained parameters, the HF export
    (merged) and the PEFT export (on the HF base, with peft) both compute what the stage's final does."""
    from peft import PeftModel

    from apriel_jax.stages.config import pipeline_config, stage
    from apriel_jax.stages.runner import Runner, stage_paths

    hf_model, base_dir, _ = hf_base
    cfg = pipeline_config()
    cfg.run_dir, cfg.base = str(tmp_path / "run"), base_dir
    cfg.export.hf_dir, cfg.export.peft_dir = str(tmp_path / "hf"), str(tmp_path / "peft")
    cfg.order = ["sft"]
    cfg.stages.sft = stage(init="base")
    t = cfg.stages.sft.train
    t.steps, t.data.seq_len, t.data.global_batch, t.optimizer.peak_lr = 2, 32, 8, 1e-2
    t.lora.rank, t.lora.dropout = RANK, 0.05
    t.checkpoint.save_every, t.checkpoint.async_save, t.eval.every = 2, False, 0
    t.log.console, t.log.tensorboard = False, False
    runner = Runner(cfg, log=lambda line: None)
    (summary,) = runner.run()
    assert summary["trainable_params"] == 2 * 4 * (192 + 128 + 128 + 4 * 192)  # the decoder's adapters
    runner.export()
    runner.export_adapters()

    final = apriel_jax.from_pretrained(stage_paths(cfg, "sft").final)
    ours = logits(final, inputs)
    err = relative_error(ours, ref.hf_logits(ref.load_hf_model(tmp_path / "hf"), inputs), inputs)
    assert err <= REL_TOL, f"merged export vs the LoRA final: {err:.2e}"
    assert json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == base_dir
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "peft").eval()
    err = relative_error(ours, ref.hf_logits(peft_model, inputs), inputs)
    assert err <= REL_TOL, f"PEFT export on the HF base vs the LoRA final: {err:.2e}"
