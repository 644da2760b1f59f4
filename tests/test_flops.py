"""Model FLOPs count against the reference figure for the benchmark config."""

import pytest

from apriel_jax.model import get_preset
from apriel_jax.train.flops import peak_flops, train_step_flops


def bench_small():
    cfg = get_preset("tiny")
    cfg.decoder.update(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
                       intermediate_size=1536, vocab_size=32768)
    return cfg


def test_decoder_only_count_matches_the_reference():
    # 1.107 TFLOP per step: the figure MaxText prints for this config (batch 4 x 1024 tokens).
    assert train_step_flops(bench_small(), batch=4, seq_len=1024) == pytest.approx(1.107e12, rel=1e-3)


def test_vision_terms():
    cfg = bench_small()
    text = train_step_flops(cfg, batch=4, seq_len=1024)
    with_images = train_step_flops(cfg, batch=4, seq_len=1024, image_patch_counts=[256, 256])
    frozen = train_step_flops(cfg, batch=4, seq_len=1024, image_patch_counts=[256, 256], train_vision=False)
    assert text < frozen < with_images
    # Attention within images: one 512-patch image costs more than two 256-patch images.
    assert train_step_flops(cfg, batch=4, seq_len=1024, image_patch_counts=[512]) > with_images


def test_peaks():
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v5") == 459e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None
