"""A training run on chat records with images and synthetic visual tasks, through a real tokenizer."""

import json
from pathlib import Path

import numpy as np

import apriel_jax
from apriel_jax.data.tokenizer import train_tiny_tokenizer
from apriel_jax.train.config import source, train_config
from apriel_jax.train.loop import train

DEMO = Path(apriel_jax.__file__).parent / "data" / "demo_data"


def test_chat_and_synthetic_visual_sources_train(tmp_path):
    texts = [json.loads(line)["text"] for line in (DEMO / "text.jsonl").read_text().splitlines()]
    tokenizer = train_tiny_tokenizer(texts, 1024, tmp_path / "tokenizer")
    cfg = train_config()
    cfg.run_dir = str(tmp_path / "run")
    cfg.data.tokenizer = str(tmp_path / "tokenizer" / "tokenizer.json")
    cfg.data.sources = [source("sft", "jsonl", [str(DEMO / "chat_sft.jsonl")], 0.3),
                        source("captions", "jsonl", [str(DEMO / "multimodal.jsonl")], 0.3),
                        source("cpt2", "synthetic", (), 0.4)]
    cfg.data.update(seq_len=768, patch_budget=256, global_batch=8, loss="responses")
    # The packed batches really carry images: every [IMG] slot receives exactly one real patch.
    from apriel_jax.train import inputs

    iterator = iter(inputs.make_dataset(cfg, cfg.data.sources, seed=0))
    patches = 0
    for _ in range(3):  # the token-weighted mixture may start with text-only chats
        batch = next(iterator)
        real_patches = batch["patch_segment_ids"] > 0
        assert (batch["tokens"] == tokenizer.image_id).sum() == real_patches.sum()
        assert (batch["patch_token_index"][real_patches] < cfg.data.seq_len).all()
        patches += int(real_patches.sum())
    assert patches > 0
    cfg.steps = 3
    cfg.eval.update(every=3, batches=1, task_samples=4)
    cfg.log.tensorboard = False
    cfg.checkpoint.save_every = 3
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["step"] == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if r.get("split", "train") == "train" and "loss" in r]
    assert len(train_rows) == 3 and all(np.isfinite(r["loss"]) for r in train_rows)
    eval_rows = [r for r in log if r.get("split") == "eval"]
    assert eval_rows and 0.0 <= eval_rows[-1]["counting_accuracy"] <= 1.0
    assert tokenizer.image_id == cfg.model.image_token_id
