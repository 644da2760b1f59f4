"""Smoke-test run: the tiny model learns the built-in text for 20 steps (well under a minute on CPU).

    apriel-jax train configs/train/tiny_text.py --config.run_dir=/tmp/tiny_text
"""

from apriel_jax.train.config import train_config


def get_config():
    cfg = train_config()
    cfg.run_dir = "runs/tiny_text"
    cfg.steps = 20
    cfg.data.seq_len = 64
    cfg.data.global_batch = 8
    cfg.optimizer.peak_lr = 3e-3
    cfg.checkpoint.save_every = 10
    cfg.eval.every = 10
    cfg.eval.batches = 1
    return cfg
