"""Ahead-of-time compilation of the real training step for a TPU topology, from this CPU host (libtpu).

The full 48-layer model is compiled by ``benchmarks/aot.py`` (minutes); here the real widths (hidden
5120, vocab 131072, 32/8 heads, Pixtral vision) with 2 layers per tower keep the test fast while still
exercising every sharding rule in a real XLA:TPU compile.
"""

import pytest

pytest.importorskip("libtpu")

from apriel_jax.model import get_preset, param_count  # noqa: E402
from apriel_jax.parallel.collectives import collectives_per_step  # noqa: E402
from apriel_jax.train.aot import compile_train_step  # noqa: E402
from apriel_jax.train.optimizer import cosine, make_optimizer  # noqa: E402


def test_real_width_step_compiles_and_fits_v5p():
    cfg = get_preset("apriel_15b")
    cfg.decoder.num_layers = cfg.vision.num_layers = 2
    cfg.dtype, cfg.remat_policy = "bfloat16", "full"
    result, flops = compile_train_step(cfg, make_optimizer(cosine(5e-5, 100)), "v5p:2x2x1", {"fsdp": 4},
                                       batch=4, seq=1024, patches=256, chunk_size=256)  # 4 loss chunks
    assert result.fits(), result
    # fp32 parameters + two fp32 Adam moments, sharded 4 ways, are every chip's arguments (+ the batch).
    state_bytes_per_chip = param_count(cfg) * 12 / 4
    assert state_bytes_per_chip <= result.argument_bytes < state_bytes_per_chip * 1.05, result
    assert flops > 0 and result.temp_bytes > 0

    # Communication, read from the compiled HLO: the LM head [5120, 131072] is gathered once per step and
    # its gradient reduce-scattered once per step, both in bf16 (not once per loss chunk in each pass).
    assert result.hlo_text, result.hlo_error
    head = [(op.kind, op.dtype, op.per_step) for op in collectives_per_step(result.hlo_text).ops
            if op.shape == (cfg.decoder.hidden_size, cfg.decoder.vocab_size)]
    assert sorted(head) == [("all-gather", "bf16", 1), ("reduce-scatter", "bf16", 1)], head
    assert result.collectives["total"]["gb"] > 2 * 5120 * 131072 * 2 / 1e9


def test_aot_command_compiles_pipeline_stages_with_the_pallas_kernel(capsys, tmp_path):
    """`apriel-jax aot` on the demo pipeline (a frozen-vision stage and a multimodal one) for a v5e slice,
    with attention on the Mosaic kernel, as a production config would run it."""
    import json

    from pathlib import Path

    from apriel_jax.cli import main

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "demo.py")
    out = tmp_path / "aot.json"
    code = main(["aot", demo, "--stage", "realign", "--stage", "cpt2", "--topology",
                 "v5e:2x2", "--config.model.attention_impl=auto", "--config.model.dtype=bfloat16",
                 "--json", str(out), "--hlo", str(tmp_path / "hlo")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = json.loads(out.read_text())
    assert set(rows) == {"realign", "cpt2"}
    for row in rows.values():
        assert row["chips"] == 4 and row["attention"] == "auto" and 0 < row["hbm_use"] < 0.85
        assert row["model_tflop_per_chip"] > 0
        # FSDP over 4 chips: every step gathers weights and reduces gradients.
        assert row["collectives"]["all-gather"]["gb"] > 0 and row["collectives"]["total"]["ops"] > 0
    assert "realign " in printed and "cpt2 " in printed
    assert "collectives per chip per step" in printed
    for stage in ("realign", "cpt2"):
        assert "all-gather" in (tmp_path / "hlo" / f"{stage}.hlo.txt").read_text()
    assert main(["aot", demo, "--stage", "nope", "--topology", "v5e:2x2"]) == 2


def test_aot_generate_compiles_kv_cached_generation_for_one_chip(capsys, tmp_path):
    """`apriel-jax aot --generate N` compiles the prefill + decode loop for a single-chip topology (Colab's
    v6e-1), whose 1x1 layout is smaller than a TPU host's 2x2 chips."""
    import json

    from pathlib import Path

    from apriel_jax.cli import main
    from apriel_jax.model import get_preset

    config = str(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_text.py")
    out = tmp_path / "gen.json"
    code = main(["aot", config, "--topology", "v6e:1x1", "--generate", "512", "--config.model.dtype=bfloat16",
                 "--config.data.seq_len=128", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "KV-cached generation of 512 new tokens" in printed
    row = json.loads(out.read_text())["train"]
    assert row["chips"] == 1 and row["new_tokens"] == 512 and row["seq"] == 128 and row["hbm_use"] < 0.85
    d = get_preset("tiny").decoder
    kv_cache = 2 * d.num_layers * (128 + 512) * d.num_kv_heads * d.head_dim * 2  # k and v, bf16
    assert row["temp_gb"] * 1e9 >= kv_cache, row
    assert row["model_tflop_per_chip"] > 0
    assert main(["aot", config, "--topology", "v6e:1x1", "--generate", "-1"]) == 2
