"""Ahead-of-time compilation of the real training step for a TPU topology, from this CPU host (libtpu).

The full 48-layer model is compiled by ``benchmarks/aot.py`` (minutes); here the real widths (hidden
5120, vocab 131072, 32/8 heads, Pixtral vision) with 2 layers per tower keep the test fast while still
exercising every sharding rule in a real XLA:TPU compile.
"""

import pytest

pytest.importorskip("libtpu")

from apriel_jax.model import get_preset, param_count  # noqa: E402
from apriel_jax.train.aot import compile_train_step  # noqa: E402
from apriel_jax.train.optimizer import cosine, make_optimizer  # noqa: E402


def test_real_width_step_compiles_and_fits_v5p():
    cfg = get_preset("apriel_15b")
    cfg.decoder.num_layers = cfg.vision.num_layers = 2
    cfg.dtype, cfg.remat_policy = "bfloat16", "full"
    result, flops = compile_train_step(cfg, make_optimizer(cosine(5e-5, 100)), "v5p:2x2x1", {"fsdp": 4},
                                       batch=4, seq=1024, patches=256)
    assert result.fits(), result
    # fp32 parameters + two fp32 Adam moments, sharded 4 ways, are every chip's arguments (+ the batch).
    state_bytes_per_chip = param_count(cfg) * 12 / 4
    assert state_bytes_per_chip <= result.argument_bytes < state_bytes_per_chip * 1.05, result
    assert flops > 0 and result.temp_bytes > 0
