"""The Apriel-1.5-15B recipe (arXiv 2510.01141) at full scale, sized for TPU v5p pods.

    apriel-jax pipeline configs/pipelines/apriel_15b.py --plan
    apriel-jax aot configs/pipelines/apriel_15b.py --stage cpt1 --topology v5p:4x4x4
    apriel-jax pipeline configs/pipelines/apriel_15b.py:gs://bucket/apriel-data \
        --config.base=/ckpt/pixtral-12b-hf --config.run_dir=gs://bucket/apriel-15b

Stage settings follow the paper (sequence lengths, learning rates, schedules, frozen groups, mixture
proportions, checkpoint averaging and merging). What the paper does not publish is marked "not published"
below and set to a reasonable value: batch sizes, token budgets, the exact upscaling layer map, SFT warmup.

Data: the data root given after the config path (``CONFIG:ROOT``, local or ``gs://``) holds one folder per
source written by ``apriel-jax data prepare`` (ArrayRecord shards + ``manifest.json``): text, replay,
multimodal, and the SFT sets named below. Write each with ``apriel-jax data prepare
'gs://bucket/raw/NAME/*.jsonl' --out ROOT/NAME`` (text: ``{"text": ...}`` records; multimodal and SFT: chat
records with their images, which prepare embeds). A source names the folder, not a glob of its shards: the
folder's manifest is written last, so a prepare that was interrupted (shards but no manifest) is refused
instead of read in part. A run lists each source's files once and its checkpoints record the list, so a
resumed stage reads the same shards even if the folder changed. Replace the source names/paths with your
own (files, globs, ``data prepare`` folders, or ``parquet``/``jsonl``/``tfds`` sources); the mixture
weights are the paper's.
"""

from apriel_jax.model import get_preset
from apriel_jax.stages.config import pipeline_config, stage
from apriel_jax.train.config import source

SEQ = {"upscale": 8192, "realign": 8192, "cpt1": 32768, "cpt2": 16384, "sft": 32768, "sft_long": 49152}
# Rows per optimizer step (2-4M tokens, in line with peers at this size; not published for Apriel). A
# multiple of the chips the batch is sharded over: 64 on v5p-128 (override for other slices, e.g.
# --config.stages.cpt2.train.data.global_batch=256 on v5e-256).
BATCH = {8192: 256, 16384: 128, 32768: 64, 49152: 64}


def _shards(root: str, name: str) -> list[str]:
    return [f"{root}/{name}"]  # a `data prepare` folder: its manifest lists the shards


def _stage(cfg, *, init="previous", trainable, seq, lr, schedule, tokens, loss="all", sources=(), patches=0,
           save_every=1000):
    s = stage(init=init, trainable=trainable)
    s.train.data.update(seq_len=seq, global_batch=BATCH[seq], patch_budget=patches, loss=loss,
                        tokenizer="pixtral", chat_format="apriel", worker_count=8)
    s.train.data.sources = list(sources)
    s.train.optimizer.update(peak_lr=lr, schedule=schedule, warmup_fraction=0.1 if schedule == "cosine" else 0.0,
                             weight_decay=0.1, clip_norm=1.0, b2=0.95)
    s.train.chunk_size = 2048
    s.train.checkpoint.update(save_every=save_every, keep_last=2)
    s.train.eval.update(every=save_every, batches=8)
    s.tokens = tokens
    return s


def get_config(data_root: str = "gs://your-bucket/apriel-data"):
    cfg = pipeline_config()
    cfg.name = "apriel_15b"
    cfg.run_dir = "gs://your-bucket/apriel-15b"  # or a shared filesystem path
    cfg.base = "/path/to/pixtral-12b-hf"  # Pixtral-12B-Base in HF layout (or Mistral consolidated)
    model = get_preset("pixtral_12b")
    model.update(dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_impl="auto")
    cfg.model = model
    # v5p-128 (64 chips, topology 4x4x4): FSDP over every chip, one 49k-token row per chip in the long SFT run
    # (full remat keeps one residual per layer; the flash kernels never build S×S scores).
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, sequence=1)
    cfg.target.topology = "v5p:4x4x4"
    root = data_root.rstrip("/")
    cfg.order = ["upscale", "realign", "cpt1", "cpt2", "sft_main", "sft_subset", "sft_long", "merge"]

    text = lambda w: source("text", "array_record", _shards(root, "text"), w)  # noqa: E731
    replay = lambda w: source("replay", "array_record", _shards(root, "replay"), w)  # noqa: E731
    multimodal = lambda w: source("multimodal", "array_record", _shards(root, "multimodal"), w)  # noqa: E731

    # §2: 40 -> 48 decoder layers by duplicating intermediate layers (exact map not published), half the
    # tokens replay; lr 5e-5 linear decay; six equispaced checkpoints averaged with equal weights.
    s = _stage(cfg, init="base", trainable=("all",), seq=SEQ["upscale"], lr=5e-5, schedule="linear",
               tokens=100_000_000_000, sources=[text(0.5), replay(0.5)])
    s.transform.update(kind="upscale", num_layers=48, identity_init=True)
    s.finalize.update(kind="average", num_checkpoints=6)
    cfg.stages.upscale = s

    # §2: projector realignment on captioning / instruction / document data; encoder and decoder frozen.
    cfg.stages.realign = _stage(cfg, trainable=("projector",), seq=SEQ["realign"], lr=5e-5, schedule="linear",
                                tokens=10_000_000_000, patches=4096, sources=[multimodal(1.0)])

    # §3.1: everything trained; 50% text, 20% replay, 30% multimodal; lr 5e-5 cosine, 10% warmup; loss on all
    # tokens; three equispaced checkpoints averaged.
    s = _stage(cfg, trainable=("all",), seq=SEQ["cpt1"], lr=5e-5, schedule="cosine", tokens=200_000_000_000,
               patches=16384, sources=[text(0.5), replay(0.2), multimodal(0.3)])
    s.finalize.update(kind="average", num_checkpoints=3)
    cfg.stages.cpt1 = s

    # §3.2: synthetic visual reasoning tasks (reconstruction, matching, detection, counting); vision encoder
    # frozen; lr 1e-5 cosine, 10% warmup; loss on responses only.
    cfg.stages.cpt2 = _stage(cfg, trainable=("projector", "decoder", "embeddings"), seq=SEQ["cpt2"], lr=1e-5,
                             schedule="cosine", tokens=50_000_000_000, loss="responses", patches=8192,
                             sources=[source("synthetic_tasks", "synthetic", (), 0.7,
                                             tasks={"reconstruction": 1.0, "matching": 1.0, "detection": 1.0,
                                                    "counting": 1.0}, image_size=1024),
                                      multimodal(0.3)])

    # §4: text SFT with reasoning traces; decoder only; 4 epochs at 32768; lr 1e-5 cosine; loss on responses.
    sft = lambda name, w: source(name, "array_record", _shards(root, name), w)  # noqa: E731
    cfg.stages.sft_main = _stage(cfg, trainable=("decoder", "embeddings"), seq=SEQ["sft"], lr=1e-5,
                                 schedule="cosine", tokens=4 * 20_000_000_000, loss="responses",
                                 sources=[sft("sft", 1.0)])
    # Two runs on top of sft_main: a stratified 25% subset for 4 more epochs, and a long-context run at 49152
    # (25k samples of 32768-49152 tokens + 100k samples <= 32768).
    cfg.stages.sft_subset = _stage(cfg, init="stage:sft_main", trainable=("decoder", "embeddings"),
                                   seq=SEQ["sft"], lr=1e-5, schedule="cosine", tokens=4 * 5_000_000_000,
                                   loss="responses", sources=[sft("sft_stratified_25pct", 1.0)])
    s = _stage(cfg, init="stage:sft_main", trainable=("decoder", "embeddings"), seq=SEQ["sft_long"], lr=1e-5,
               schedule="cosine", tokens=3_000_000_000, loss="responses",
               sources=[sft("sft_long_32k_49k", 0.6), sft("sft_le_32k", 0.4)])
    cfg.stages.sft_long = s

    # The final model: equal-weight average of the two runs.
    s = stage("merge")
    s.merge.update(stages=["sft_subset", "sft_long"], weights=[0.5, 0.5])
    cfg.stages.merge = s
    cfg.export.update(dtype="bfloat16", check_with_transformers=False)
    return cfg
