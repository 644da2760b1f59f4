"""The typed run config of ``apriel-jax train``: one ``ml_collections.ConfigDict`` per run.

Every leaf has its final type here, so ``--config.x=y`` overrides are parsed as that type (and a typo'd
key fails). Config files (``configs/train/*.py``) start from :func:`train_config` and change fields.

A data source is a plain dict ``{name, kind, paths, weight}``; ``kind`` is one of :data:`SOURCE_KINDS`:

* ``jsonl`` / ``array_record``: record files: ``{"text": ...}`` records, and with ``data.tokenizer`` set
  also chat records (``{"messages": [...]}``, images by path or inline base64);
* ``bytes_text``: plain text files, one record per non-blank paragraph; no paths = a built-in text;
* ``synthetic``: the synthetic visual task mixture of CPT stage 2 (``paths`` unused; needs ``data.tokenizer``);
* ``synthetic_text`` / ``synthetic_chat``: generated paragraphs / reasoning chats (``data.synthetic.text``),
  with a real held-out split by seed (chats need ``data.tokenizer``).

Without ``data.tokenizer`` text is byte-tokenized (ids = bytes + 20), which needs no tokenizer file; with
it (a tokenizer file/directory, or ``"pixtral"`` for the Tekken tokenizer mistral-common ships) records
go through ``data.records.RecordToDocument`` with the ``data.chat_format`` and ``data.loss`` settings.
"""

from __future__ import annotations

import ml_collections

from apriel_jax.model import get_preset

SOURCE_KINDS = ("jsonl", "array_record", "bytes_text", "synthetic", "synthetic_text", "synthetic_chat")
SCHEDULES = ("linear", "cosine")

# Exit codes of ``apriel-jax train`` (also the ``status`` of the summary train() returns).
EXIT_CODES = {"completed": 0, "diverged": 3, "preempted": 75}  # 75 = EX_TEMPFAIL: "rerun to resume"


def source(name: str, kind: str, paths=(), weight: float = 1.0, **options) -> dict:
    """One entry of ``data.sources`` / ``eval.sources``; ``options`` go to generated sources:
    ``synthetic``: ``tasks`` (task -> weight), ``image_size`` (pixels, square), ``difficulty``;
    ``synthetic_text``: ``topics`` (grammar -> weight)."""
    return dict(name=name, kind=kind, paths=list(paths), weight=float(weight), options=dict(options))


def train_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.run_dir = "runs/train"  # checkpoints/, metrics.jsonl and tensorboard/ go here
    cfg.model = get_preset("tiny")
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    # Cross-slice (DCN) degrees for multi-slice TPU runs; their product is the number of slices.
    cfg.mesh_dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=1))

    cfg.data = ml_collections.ConfigDict(dict(
        sources=[source("text", "bytes_text")],
        seq_len=64,
        patch_budget=0,  # 0: text-only batches (the vision tower does not run)
        global_batch=8,
        seed=0,
        worker_count=0,  # grain worker processes; must divide the per-process batch
        max_pending=8,
        loss="all",  # "all": every token but the first of a document counts; "responses": assistant turns only
        tokenizer="",  # "" = byte-level text; else a tokenizer path or "pixtral"
        chat_format="apriel",  # apriel | think | nothink (data.chat.ChatFormat modes)
    ))

    cfg.optimizer = ml_collections.ConfigDict(dict(
        peak_lr=1e-3, schedule="linear", warmup_fraction=0.1, final_lr_fraction=0.0,
        weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8,
    ))
    cfg.trainable = ("all",)  # groups of apriel_jax.train.optimizer.GROUPS or globs over parameter paths
    cfg.steps = 100
    cfg.grad_accum_steps = 1
    cfg.chunk_size = 1024  # sequence chunk of the cross-entropy (logits are never materialised whole)
    cfg.z_loss_weight = 0.0
    cfg.max_bad_steps = 5  # stop (after saving) when this many consecutive steps were non-finite

    cfg.checkpoint = ml_collections.ConfigDict(dict(
        dir="",  # default: RUN_DIR/checkpoints
        save_every=100,
        keep_last=2,
        keep_every=0,  # 0: none kept beyond the last keep_last
        async_save=True,
    ))
    cfg.eval = ml_collections.ConfigDict(dict(
        every=0,  # 0: no periodic evaluation
        at_start=False,  # also evaluate before the first step of a fresh run (the stage's starting point)
        batches=2,
        sources=[],  # held-out sources; empty = the training sources under eval.seed (NOT held out)
        seed=1234,
        # Held-out synthetic counting questions answered by greedy generation at each evaluation
        # (needs data.tokenizer and a patch budget); 0 = off.
        counting_samples=0,
    ))
    cfg.log = ml_collections.ConfigDict(dict(
        every=1, tensorboard=True, wandb=False, wandb_project="apriel-jax", console=True,
    ))
    cfg.init = ml_collections.ConfigDict(dict(
        seed=0,
        from_pretrained="",  # HF / Mistral / apriel-jax checkpoint directory; its model config wins
        # dtypes of a pretrained model ("" = as stored): e.g. float32 master weights, bfloat16 compute
        param_dtype="",
        dtype="",
    ))
    # Multi-process runs (apriel_jax.parallel.distributed): "auto" detects SLURM / TPU / APRIEL_* env;
    # one process needs nothing here. Left out of the cross-process config check (ids differ per process).
    cfg.distributed = ml_collections.ConfigDict(dict(
        mode="auto",  # auto | off | env | slurm | tpu
        coordinator_address="",  # host:port of process 0; "" = APRIEL_COORDINATOR_ADDRESS or SLURM's first node
        num_processes=0,  # 0 = from the environment
        process_id=-1,  # -1 = from the environment
        port=8476,  # coordinator port when the host comes from SLURM's node list
        initialization_timeout_s=300,  # then exit 69 naming the coordinator (a process is missing)
        cpu_collectives="gloo",  # cross-process collectives of CPU devices ("" = JAX's default: none)
    ))
    # Slows every step down by this many seconds: lets tests interrupt a run at a chosen step.
    # log_rows: each process appends the global row ids and token hashes it fed at every step to
    # RUN_DIR/hosts/process_<i>/rows.jsonl (shows which share of the global batch each process read).
    cfg.debug = ml_collections.ConfigDict(dict(step_sleep_s=0.0, log_rows=False))
    return cfg


def validate_train_config(cfg) -> None:
    """Raise ValueError naming the field for settings that cannot run (before anything is built)."""
    problems = []
    for where, sources in (("data.sources", cfg.data.sources), ("eval.sources", cfg.eval.sources)):
        for i, s in enumerate(sources):
            missing = {"name", "kind"} - set(s)
            if missing:
                problems.append(f"{where}[{i}] lacks {sorted(missing)}")
            elif s["kind"] not in SOURCE_KINDS:
                problems.append(f"{where}[{i}].kind={s['kind']!r} is not one of {SOURCE_KINDS}")
    if not cfg.data.sources:
        problems.append("data.sources is empty")
    if cfg.optimizer.schedule not in SCHEDULES:
        problems.append(f"optimizer.schedule={cfg.optimizer.schedule!r} is not one of {SCHEDULES}")
    for key in ("steps", "grad_accum_steps", "chunk_size", "max_bad_steps"):
        if cfg[key] < 1:
            problems.append(f"{key}={cfg[key]} must be >= 1")
    if cfg.data.global_batch < 1 or cfg.data.seq_len < 2:
        problems.append(f"data.global_batch={cfg.data.global_batch} / data.seq_len={cfg.data.seq_len} too small")
    if cfg.data.global_batch % cfg.grad_accum_steps:
        problems.append(f"data.global_batch={cfg.data.global_batch} is not a multiple of "
                        f"grad_accum_steps={cfg.grad_accum_steps}")
    if problems:
        raise ValueError("bad train config: " + "; ".join(problems))
