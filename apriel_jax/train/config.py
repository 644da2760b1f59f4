"""The typed run config of ``apriel-jax train``: one ``ml_collections.ConfigDict`` per run.

Every leaf has its final type here, so ``--config.x=y`` overrides are parsed as that type (and a typo'd
key fails). Config files (``configs/train/*.py``) start from :func:`train_config` and change fields.

A data source is a plain dict ``{name, kind, paths, weight, options}``; ``kind`` is one of :data:`SOURCE_KINDS`:

* ``jsonl`` / ``array_record``: record files: ``{"text": ...}`` records, and with ``data.tokenizer`` set
  also chat records (``{"messages": [...]}``, images by path or inline base64);
* ``parquet``: Parquet files, a ``text`` or ``messages`` column and image bytes in an ``images``/``image``
  column (the layout of most public VLM datasets; mapping in ``apriel_jax.data.columns``);
* ``bytes_text``: plain text files, one record per non-blank paragraph; no paths = a built-in text;
* ``tfds``: a TFDS split; ``paths`` = [a registered dataset name, or a prepared builder directory]
  (options ``split``, ``data_dir``), examples mapped like Parquet rows;
* ``synthetic``: the synthetic visual task mixture of CPT stage 2 (``paths`` unused; needs ``data.tokenizer``);
* ``synthetic_text`` / ``synthetic_chat``: generated paragraphs / reasoning chats (``data.synthetic.text``),
  with a real held-out split by seed (chats need ``data.tokenizer``).

The ``paths`` of the file-backed kinds (:data:`FILE_SOURCE_KINDS`) are files, globs (``gs://b/text/*.array_record``)
or, for ``array_record``, directories written by ``apriel-jax data prepare``; local or ``gs://``. A run
expands them once into the source's ``files`` (sorted), which its checkpoints record, so a resumed run reads
the same files (``apriel_jax.train.inputs.resolve_data_files``).

Without ``data.tokenizer`` text is byte-tokenized (ids = bytes + 20), which needs no tokenizer file; with
it (a tokenizer file/directory, or ``"pixtral"`` for the Tekken tokenizer mistral-common ships) records
go through ``data.records.RecordToDocument`` with the ``data.chat_format`` and ``data.loss`` settings.
"""

from __future__ import annotations

import math

import ml_collections

from apriel_jax.model import get_preset
from apriel_jax.model.lora import lora_config, settings_problems
from apriel_jax.model.quant import DECODER_PROJECTIONS, EMBEDDING_TABLES, QUANTIZED_LEAVES, quant_config
from apriel_jax.model.quant import embeddings_enabled as quant_embeddings_enabled, enabled as quant_enabled
from apriel_jax.model.quant import settings_problems as quant_settings_problems

SOURCE_KINDS = ("jsonl", "array_record", "parquet", "bytes_text", "tfds", "synthetic", "synthetic_text",
                "synthetic_chat")
# Kinds whose ``paths`` name files (expanded into ``files`` when a run starts).
FILE_SOURCE_KINDS = ("jsonl", "array_record", "parquet", "bytes_text")
# The options each kind understands (other kinds take none).
SOURCE_OPTIONS = {
    "parquet": ("text_column", "messages_column", "images_column"),
    "tfds": ("split", "data_dir", "text_column", "messages_column", "images_column"),
    "synthetic": ("tasks", "image_size", "difficulty"),
    "synthetic_text": ("topics",),
}
SCHEDULES = ("linear", "cosine")

# Exit codes of ``apriel-jax train`` (also the ``status`` of the summary train() returns).
# 75 = EX_TEMPFAIL: "rerun to resume"; 74 = EX_IOERR: storage failed mid-run (a data shard that stayed
# unreadable after retries, a checkpoint that could not be written); the checkpoints already saved are intact.
# 65 = EX_DATAERR: more than data.max_skip_fraction of the records read were malformed (checkpoint saved).
EXIT_CODES = {"completed": 0, "diverged": 3, "bad_data": 65, "io_error": 74, "preempted": 75}


def source(name: str, kind: str, paths=(), weight: float = 1.0, **options) -> dict:
    """One entry of ``data.sources`` / ``eval.sources``. ``paths``: files, globs or prepared directories
    (local or ``gs://``) for the file-backed kinds, ``[name or builder dir]`` for ``tfds``. ``options``:
    ``parquet``: ``text_column`` / ``messages_column`` / ``images_column`` (defaults ``text``,
    ``messages``, ``images`` or ``image``; ``""`` ignores images);
    ``tfds``: ``split`` (default ``train``), ``data_dir``, and the same column names;
    ``synthetic``: ``tasks`` (task -> weight), ``image_size`` (pixels, square), ``difficulty``;
    ``synthetic_text``: ``topics`` (grammar -> weight)."""
    if isinstance(paths, str):
        paths = [paths]
    return dict(name=name, kind=kind, paths=list(paths), weight=float(weight), options=dict(options))


def train_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.run_dir = "runs/train"  # checkpoints/, metrics.jsonl and tensorboard/ go here
    # JAX's persistent compilation cache (apriel_jax.utils.compile_cache): "" = $APRIEL_COMPILE_CACHE or
    # RUN_DIR/compile_cache; "none" = off; else a directory or gs:// URL. A restarted run skips compiling.
    cfg.compile_cache = ""
    # The model built from init.seed; with init.from_pretrained the checkpoint's model instead, computed with this
    # block's remat_policy, remat_group and attention_impl (the memory policy `apriel-jax aot` sized the run for).
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
        # A malformed record (named by file:line and a reason, see apriel_jax.data.errors.REASONS):
        # "skip" it (counted per reason, in the metrics) or stop the run ("error").
        on_invalid="skip",
        # Stop when more than this fraction of the records read were skipped (1.0: never). A curated
        # dataset loses far less than 1%; a systematic fault (wrong image folder, a format not understood,
        # loss on responses over chats without answers) loses far more, and should stop the run early.
        max_skip_fraction=0.01,
        skip_check_after=1000,  # records read before max_skip_fraction applies (a few early skips are noise)
    ))

    cfg.optimizer = ml_collections.ConfigDict(dict(
        peak_lr=1e-3, schedule="linear", warmup_fraction=0.1, final_lr_fraction=0.0,
        weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8,
    ))
    # Groups of apriel_jax.train.optimizer.GROUPS or globs over parameter paths; "!x" excludes x. With
    # data.patch_budget 0 the vision tower and projector are excluded (the step never runs them).
    cfg.trainable = ("all",)
    # LoRA (apriel_jax/model/lora.py): rank > 0 adds adapters to the target_modules (PEFT names) of the model,
    # random or from init.from_pretrained, and trains only them: the adapters inside the `trainable` parts
    # get gradients and optimizer state, every base weight stays frozen.
    cfg.lora = lora_config()
    # A quantized frozen base (apriel_jax/model/quant.py): mode "int8" | "int4" stores the decoder's seven
    # projections quantized (the pretrained ones quantized as they are read), embeddings=True the token
    # embedding and LM head in int8 too; they never train, so it goes with LoRA (lora.rank > 0) or with
    # `trainable` parts that leave the quantized ones out.
    cfg.quant = quant_config()
    cfg.steps = 100
    cfg.grad_accum_steps = 1
    cfg.chunk_size = 1024  # sequence chunk of the cross-entropy (logits are never materialised whole)
    cfg.z_loss_weight = 0.0
    # The dtype the LM head's gradient is accumulated over the loss chunks and summed across devices in (once
    # per micro-batch): "" = the model's compute dtype (bfloat16 on accelerators, as the layers' gradients are
    # reduced); "float32" costs twice the bytes on the wire and in memory.
    cfg.lm_head_grad_dtype = ""
    cfg.max_bad_steps = 5  # stop (after saving) when this many consecutive steps were non-finite

    cfg.checkpoint = ml_collections.ConfigDict(dict(
        dir="",  # default: RUN_DIR/checkpoints
        save_every=100,
        keep_last=2,
        keep_every=0,  # 0: none kept beyond the last keep_last
        async_save=True,
        # A latest checkpoint that cannot be restored (a damaged file): resume from the newest intact one
        # and move the damaged ones aside (True), or stop and say so (False; `apriel-jax train --no-fallback`).
        fallback=True,
    ))
    cfg.eval = ml_collections.ConfigDict(dict(
        every=0,  # 0: no periodic evaluation
        at_start=False,  # also evaluate before the first step of a fresh run (the stage's starting point)
        batches=2,
        sources=[],  # held-out sources; empty = the training sources under eval.seed (NOT held out)
        seed=1234,
        # Held-out synthetic visual questions per task in eval.tasks, answered by greedy generation at each
        # evaluation with the real images and with blank ones (apriel_jax/train/task_eval.py; needs
        # data.tokenizer and a patch budget); 0 = off.
        task_samples=0,
        tasks=["counting"],
    ))
    cfg.log = ml_collections.ConfigDict(dict(
        every=1, tensorboard=True, wandb=False, wandb_project="apriel-jax", console=True,
        # A gs:// run dir: metrics.jsonl and TensorBoard events are uploaded at most this often (and always
        # before a checkpoint is saved and at the end); a local run dir is written at every step.
        remote_flush_s=30.0,
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
        heartbeat_timeout_s=100,  # a process silent this long is dead: the others abort (SIGABRT) then
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
            problems.extend(_source_problems(f"{where}[{i}]", s))
    if not cfg.data.sources:
        problems.append("data.sources is empty")
    problems.extend(_data_problems(cfg.data))
    if cfg.optimizer.schedule not in SCHEDULES:
        problems.append(f"optimizer.schedule={cfg.optimizer.schedule!r} is not one of {SCHEDULES}")
    problems.extend(_number_problems(cfg))
    problems.extend(settings_problems(cfg.lora))
    problems.extend(_quant_problems(cfg))
    for key in ("steps", "grad_accum_steps", "chunk_size", "max_bad_steps"):
        if cfg[key] < 1:
            problems.append(f"{key}={cfg[key]} must be >= 1")
    if cfg.lm_head_grad_dtype not in ("", "bfloat16", "float32"):
        problems.append(f"lm_head_grad_dtype={cfg.lm_head_grad_dtype!r} is not one of '', 'bfloat16', 'float32'")
    if cfg.data.global_batch < 1 or cfg.data.seq_len < 2:
        problems.append(f"data.global_batch={cfg.data.global_batch} / data.seq_len={cfg.data.seq_len} too small")
    if cfg.data.global_batch % cfg.grad_accum_steps:
        problems.append(f"data.global_batch={cfg.data.global_batch} is not a multiple of "
                        f"grad_accum_steps={cfg.grad_accum_steps}")
    if problems:
        raise ValueError("bad train config: " + "; ".join(problems))


def _quant_problems(cfg) -> list[str]:
    """A quantized base whose quantized projections the run would train (no LoRA): they cannot train."""
    quant = cfg.get("quant")
    if quant is None:
        return []
    problems = quant_settings_problems(quant)
    if problems or not quant_enabled(cfg) or cfg.lora.rank:
        return problems
    from apriel_jax.train.optimizer import quantized_trained, trainable_for_step

    owners = [f"decoder/layers/{a}/{b}" for a, b in DECODER_PROJECTIONS.values()]
    if quant_embeddings_enabled(cfg):
        owners += list(EMBEDDING_TABLES)
    names = [f"{owner}/{leaf}" for owner in owners for leaf in QUANTIZED_LEAVES]
    trained = quantized_trained(names, trainable_for_step(cfg.trainable, cfg.data.patch_budget))
    if trained:
        problems.append(f"quant.mode={quant.mode!r} freezes the quantized weights, but trainable={tuple(cfg.trainable)} "
                        f"trains them (e.g. {trained[0]}) and lora.rank is 0: train LoRA adapters on the quantized "
                        "base (lora.rank > 0), leave the quantized parts out of trainable, or set quant.mode='none'")
    return problems


# (field, lowest, highest, whether the lowest is allowed): every such number must also be finite. A
# negative learning rate trains uphill and a NaN one poisons the first update: both are refused here.
_NUMBER_RANGES = (
    ("optimizer.peak_lr", 0.0, math.inf, False),
    ("optimizer.warmup_fraction", 0.0, 1.0, True),
    ("optimizer.final_lr_fraction", 0.0, 1.0, True),
    ("optimizer.weight_decay", 0.0, math.inf, True),
    ("optimizer.clip_norm", 0.0, math.inf, True),  # 0: no clipping
    ("optimizer.b1", 0.0, 1.0, True),
    ("optimizer.b2", 0.0, 1.0, True),
    ("optimizer.eps", 0.0, math.inf, False),
    ("z_loss_weight", 0.0, math.inf, True),
    ("log.remote_flush_s", 0.0, math.inf, True),
    ("debug.step_sleep_s", 0.0, math.inf, True),
)
_AT_LEAST = (("checkpoint.save_every", 1), ("checkpoint.keep_last", 1), ("checkpoint.keep_every", 0),
             ("eval.every", 0), ("eval.batches", 1), ("eval.task_samples", 0), ("log.every", 1))


def _number_problems(cfg) -> list[str]:
    """Numbers out of range or not finite, each named by its field."""
    def get(key):
        node = cfg
        for part in key.split("."):
            node = node[part]
        return node

    problems = []
    for key, low, high, low_ok in _NUMBER_RANGES:
        value = get(key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and (low < value or low_ok and low == value)
                and value <= high):
            bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
            problems.append(f"{key}={value!r} must be a finite number {bound}")
    for key, least in _AT_LEAST:
        if get(key) < least:
            problems.append(f"{key}={get(key)} must be >= {least}")
    return problems


def _data_problems(data) -> list[str]:
    """What is wrong with the data section's settings (other than its sources)."""
    from apriel_jax.data.chat import MODES
    from apriel_jax.data.validate import ON_INVALID

    problems = []
    if data.on_invalid not in ON_INVALID:
        problems.append(f"data.on_invalid={data.on_invalid!r} is not one of {ON_INVALID}")
    if not (math.isfinite(data.max_skip_fraction) and 0.0 <= data.max_skip_fraction <= 1.0):
        problems.append(f"data.max_skip_fraction={data.max_skip_fraction} must be in [0, 1] (1: never stop)")
    if data.skip_check_after < 0:
        problems.append(f"data.skip_check_after={data.skip_check_after} must be >= 0")
    if data.loss not in ("all", "responses"):
        problems.append(f"data.loss={data.loss!r} is not 'all' or 'responses'")
    if data.chat_format not in MODES:
        problems.append(f"data.chat_format={data.chat_format!r} is not one of {MODES}")
    for key, least in (("patch_budget", 0), ("worker_count", 0), ("max_pending", 1)):
        if data[key] < least:
            problems.append(f"data.{key}={data[key]} must be >= {least}")
    return problems


def _source_problems(where: str, s) -> list[str]:
    missing = {"name", "kind"} - set(s)
    if missing:
        return [f"{where} lacks {sorted(missing)}"]
    kind = s["kind"]
    if kind not in SOURCE_KINDS:
        return [f"{where}.kind={kind!r} is not one of {SOURCE_KINDS}"]
    problems = []
    weight = s.get("weight", 1.0)
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        problems.append(f"{where}.weight={weight!r} must be a positive finite number")
    paths = s.get("paths") or []
    if isinstance(paths, str):
        problems.append(f"{where}.paths must be a list of paths, got the string {paths!r}")
    elif kind in ("jsonl", "array_record", "parquet") and not paths:
        problems.append(f"{where} ({kind}) has no paths (files, globs or directories, local or gs://)")
    elif kind == "tfds" and len(paths) != 1:
        problems.append(f"{where} (tfds) needs paths=[a dataset name or a prepared builder directory], got {paths}")
    unknown = sorted(set(s.get("options") or {}) - set(SOURCE_OPTIONS.get(kind, ())))
    if unknown:
        allowed = list(SOURCE_OPTIONS.get(kind, ()))
        problems.append(f"{where} ({kind}) has unknown options {unknown}; it takes {allowed}")
    return problems
