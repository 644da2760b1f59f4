"""The demo pipeline: the whole Apriel recipe on a tiny model, on CPU, in minutes.

    apriel-jax pipeline                        # = apriel-jax pipeline configs/pipelines/demo.py
    apriel-jax pipeline configs/pipelines/demo.py --plan

The model keeps every architectural feature of Apriel (Pixtral-style vision tower with 2-D RoPE, GELU
projector, GQA decoder with decoupled head_dim) at toy width. Data ships with the package or is generated:
templated text with a held-out split, the shipped captions and SFT chats, synthetic visual tasks
(counting, matching, detection, colour and shape naming) and generated reasoning chats. The tokenizer is a
small byte-level BPE trained on that data (apriel_jax/data/demo_data/tokenizer.json; the production config uses
Pixtral's Tekken tokenizer).

Stages (the paper's, scaled down): base (stands in for the pretrained Pixtral-12B: a random model
pretrained on text) -> upscale (decoder 4 -> 6 layers, identity-initialised copies, 50% replay, average
of 3 equispaced checkpoints) -> realign (projector only) -> cpt1 (everything; 50% text / 20% replay / 30%
multimodal; average of 3) -> cpt2 (vision frozen; synthetic visual tasks; loss on responses) -> sft_main
(decoder only; reasoning chats) -> sft_subset and sft_long (two runs on top of sft_main) -> merge (equal
weights) -> export to Hugging Face format.
"""

from pathlib import Path

import apriel_jax
from apriel_jax.model.config import decoder_config, model_config, projector_config, vision_config
from apriel_jax.stages.config import pipeline_config, stage
from apriel_jax.train.config import source

DEMO = Path(apriel_jax.__file__).parent / "data" / "demo_data"
TOKENIZER = str(DEMO / "tokenizer.json")

# Generated sources: training draws from seed `data.seed`, evaluation from `eval.seed` (disjoint samples).
ORIGINAL_TEXT = dict(topics={"arithmetic": 1.0, "scenes": 1.0})  # the "pretraining" distribution (replayed)
NEW_TEXT = dict(topics={"procedures": 1.0, "arithmetic": 0.5})
VISUAL_TASKS = dict(image_size=64, tasks={"counting": 2.0, "detection": 1.0, "matching": 1.0, "color": 1.0,
                                           "shape": 1.0})
# CPT-2's tasks are the ones its summary scores (apriel_jax/train/task_eval.py), at the easiest setting: one
# large centred shape whose colour (4) or outline (3, drawn in one colour) is named, drawn uniformly so that no
# name is a safe guess; 1-4 shapes of one colour to count, one per 16 px cell (uniformly 1-4). 32 px images are
# 2 x 2 patches, so each counted shape lies in its own patch: a question is ~25 tokens. Shape is the slowest of
# the three to learn and gets half the data; colour and counting are learned within half of CPT-2 on the rest.
# The realign and CPT-1 stages see the same images, so the vision encoder, frozen in CPT-2 as in the paper, is
# trained on them in CPT-1.
PROBES = dict(image_size=32, difficulty=0.0, tasks={"counting": 0.5, "color": 0.5, "shape": 1.0})


def demo_model():
    return model_config(
        vision=vision_config(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, head_dim=16,
                             image_size=64),
        projector=projector_config(bias=True),
        decoder=decoder_config(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4,
                               num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=1e6,
                               max_position_embeddings=4096),
    )


def _common(s, *, seq_len, patch_budget=0, batch=8, lr, schedule="cosine", steps, loss="all",
            chat_format="apriel", save_every=None, eval_every=None):
    s.train.data.update(seq_len=seq_len, patch_budget=patch_budget, global_batch=batch, loss=loss,
                        tokenizer=TOKENIZER, chat_format=chat_format)
    s.train.optimizer.update(peak_lr=lr, schedule=schedule, warmup_fraction=0.1, weight_decay=0.01)
    s.train.steps = steps
    s.train.checkpoint.update(save_every=save_every or steps, keep_last=2)
    s.train.eval.update(every=eval_every or steps, batches=2, at_start=True)
    s.train.log.update(tensorboard=False, console=False)
    return s


def get_config():
    cfg = pipeline_config()
    cfg.name = "demo"
    cfg.run_dir = "runs/demo"
    cfg.model = demo_model()
    cfg.order = ["base", "upscale", "realign", "cpt1", "cpt2", "sft_main", "sft_subset", "sft_long", "merge"]

    text_eval = [source("text", "synthetic_text", weight=1.0, **ORIGINAL_TEXT),
                 source("new_text", "synthetic_text", weight=1.0, **NEW_TEXT)]
    visual_eval = [source("tasks", "synthetic", weight=1.0, **VISUAL_TASKS)]

    s = _common(stage(init="random", trainable=("all",)), seq_len=256, lr=3e-3, steps=30, eval_every=15)
    s.description = "stands in for the pretrained base model: random init, text pretraining"
    s.train.data.sources = [source("text", "synthetic_text", weight=1.0, **ORIGINAL_TEXT)]
    s.train.eval.sources = text_eval[:1]
    cfg.stages.base = s

    s = _common(stage(trainable=("all",)), seq_len=256, lr=1e-3, schedule="linear", steps=9, save_every=3)
    s.description = "depth upscaling 4 -> 6 decoder layers, 50% replay, average of 3 equispaced checkpoints"
    s.transform.update(kind="upscale", num_layers=6, identity_init=True)
    s.train.data.sources = [source("new_text", "synthetic_text", weight=0.4, **NEW_TEXT),
                            source("shipped_text", "jsonl", [str(DEMO / "text.jsonl")], 0.1),
                            source("replay", "synthetic_text", weight=0.5, **ORIGINAL_TEXT)]
    s.train.eval.sources = text_eval
    s.finalize.update(kind="average", num_checkpoints=3)
    cfg.stages.upscale = s

    s = _common(stage(trainable=("projector",)), seq_len=384, patch_budget=128, lr=3e-3, schedule="linear",
                steps=12)
    s.description = "projector realignment: vision encoder and decoder frozen"
    s.train.data.sources = [source("captions", "jsonl", [str(DEMO / "multimodal.jsonl")], 0.3),
                            source("visual_tasks", "synthetic", weight=0.7, **PROBES)]
    s.train.eval.sources = visual_eval
    cfg.stages.realign = s

    s = _common(stage(trainable=("all",)), seq_len=384, patch_budget=128, lr=1e-3, steps=30, save_every=10)
    s.description = "CPT stage 1: everything trained; 50% text / 20% replay / 30% multimodal"
    s.train.data.sources = [source("text", "synthetic_text", weight=0.5, **NEW_TEXT),
                            source("replay", "synthetic_text", weight=0.2, **ORIGINAL_TEXT),
                            source("multimodal", "synthetic", weight=0.3, **PROBES)]
    s.train.eval.sources = visual_eval + text_eval
    s.finalize.update(kind="average", num_checkpoints=3)
    cfg.stages.cpt1 = s

    # mistral_instruct has no system prompt: a question is ~25 tokens (6 of them the 32 px image), so a
    # 128-token row packs ~4. Many small steps teach more than few large ones: 60 steps of 384-token rows
    # reached 0.35-0.46 colour accuracy; 120 of these 0.77 colour, 0.88 shape (colour and shape only). With
    # counting as a third task (equal shares), colour and counting reached 1.0 by step 90 of 180 and shape
    # 0.85 (0.92 at 180); 150 steps with shape at half the data are the demo's compromise with its run time.
    s = _common(stage(trainable=("projector", "decoder", "embeddings")), seq_len=128, patch_budget=32,
                lr=3e-3, steps=150, loss="responses", chat_format="mistral_instruct")
    s.description = "CPT stage 2: synthetic visual tasks, vision encoder frozen, loss on responses"
    s.train.data.sources = [source("visual_tasks", "synthetic", weight=1.0, **PROBES)]
    s.train.eval.sources = [source("tasks", "synthetic", weight=1.0, **PROBES)]
    # 2 x 48 questions per task (real and blank images), one batched generate call: at the start and end
    s.train.eval.update(tasks=list(PROBES["tasks"]), task_samples=48)
    cfg.stages.cpt2 = s

    sft_eval = [source("reasoning_chats", "synthetic_chat", weight=1.0)]
    s = _common(stage(trainable=("decoder", "embeddings")), seq_len=256, lr=1e-3, steps=16, loss="responses")
    s.description = "SFT: text reasoning chats, decoder only, loss on responses"
    s.train.data.sources = [source("chats", "jsonl", [str(DEMO / "chat_sft.jsonl")], 0.2),
                            source("reasoning_chats", "synthetic_chat", weight=0.8)]
    s.train.eval.sources = sft_eval
    cfg.stages.sft_main = s

    s = _common(stage(init="stage:sft_main", trainable=("decoder", "embeddings")), seq_len=256, lr=5e-4,
                steps=8, loss="responses")
    s.description = "SFT run 1 on top of sft_main: a subset, more epochs"
    s.train.data.sources = [source("reasoning_chats", "synthetic_chat", weight=1.0)]
    s.train.data.seed = 1
    s.train.eval.sources = sft_eval
    cfg.stages.sft_subset = s

    s = _common(stage(init="stage:sft_main", trainable=("decoder", "embeddings")), seq_len=384,
                lr=5e-4, steps=8, loss="responses")
    s.description = "SFT run 2 on top of sft_main: longer sequences"
    s.train.data.sources = [source("chats", "jsonl", [str(DEMO / "chat_sft.jsonl")], 0.3),
                            source("reasoning_chats", "synthetic_chat", weight=0.7)]
    s.train.data.seed = 2
    s.train.eval.sources = sft_eval
    cfg.stages.sft_long = s

    s = stage("merge")
    s.description = "final model: equal-weight average of the two SFT runs"
    s.merge.update(stages=["sft_subset", "sft_long"], weights=[0.5, 0.5])
    cfg.stages.merge = s

    cfg.export.hf_dir = ""  # default: RUN_DIR/export/hf
    return cfg


def shrink_to_smoke_size(cfg, *, averaged_save_every: int = 1):
    """Cut every training stage of a pipeline config to a few steps, in place (tests, the notebooks' smoke
    mode): 2 steps, or for an averaged stage exactly its ``num_checkpoints`` checkpoints,
    ``averaged_save_every`` steps apart; one held-out batch at the end; 4 questions per scored task."""
    for name in cfg.order:
        s = cfg.stages[name]
        if s.kind != "train":
            continue
        if s.finalize.kind == "average":
            s.train.checkpoint.save_every = averaged_save_every
            s.train.steps = s.finalize.num_checkpoints * averaged_save_every
        else:
            s.train.steps = 2
            s.train.checkpoint.save_every = s.train.steps
        s.train.eval.update(every=s.train.steps, batches=1)
        if s.train.eval.task_samples:
            s.train.eval.task_samples = 4
    return cfg
