"""The typed config of ``apriel-jax pipeline``: a chain of stages, each one declarative.

A pipeline config is an ``ml_collections.ConfigDict``::

    run_dir    where every stage writes STAGE/run (train run), STAGE/final (model) and STAGE/DONE.json
    compile_cache    JAX's compilation cache shared by every stage (default: run_dir/compile_cache)
    model      the model config used when the first stage starts from ``init="random"``
    mesh, mesh_dcn, tokenizer, chat_format    shared by every stage (a stage's ``train`` may override)
    order      the stage names in execution order
    stages     one ConfigDict per stage name (see :func:`stage`)
    export     where the last stage's final model is exported in Hugging Face format (and its LoRA adapters
               in PEFT's, ``export.peft_dir``)

Stages are keyed by name (not listed) so command-line overrides stay readable:
``--config.stages.cpt1.train.steps=10``.

A stage names:

* ``init``: ``"previous"`` (the previous stage's final), ``"random"`` (``model`` with ``init_seed``),
  ``"stage:NAME"`` (another stage's final), ``"base"`` (the pipeline's ``base`` checkpoint), or a
  checkpoint directory (HF, Mistral or apriel-jax);
* ``mesh``: degrees that differ from the pipeline's mesh (0 = inherit);
* ``transform``: ``"none"`` or ``"upscale"`` (decoder ``layer_map`` / ``num_layers``, ``identity_init``);
* ``train``: fields of the run config (:func:`apriel_jax.train.config.train_config`): trainable groups,
  data mixture, sequence length, batch, optimizer and schedule, checkpoint cadence, eval; ``tokens`` (if
  > 0) sets the length in tokens instead of ``train.steps``; ``train.compile_cache`` is the pipeline's;
  ``train.lora.rank`` > 0 makes it a LoRA stage: adapters on the initial model, only they train, and its
  final holds them (the next stage, and the HF export, see them merged; ``export.peft_dir`` writes them
  in PEFT's layout);
* ``finalize``: ``"last"`` (the final checkpoint) or ``"average"`` (equal-weight average of the last
  ``num_checkpoints`` equispaced checkpoints, ``interval`` steps apart);
* ``kind="merge"`` instead of training: a weighted average of other stages' finals (``merge.stages``,
  ``merge.weights`` summing to 1).
"""

from __future__ import annotations

import math

import ml_collections

from apriel_jax.model import get_preset
from apriel_jax.train.config import train_config

STAGE_KINDS = ("train", "merge")
TRANSFORMS = ("none", "upscale")
FINALIZE = ("last", "average")


def stage(kind: str = "train", *, init: str = "previous", **train_overrides) -> ml_collections.ConfigDict:
    """One stage with every field present (so overrides are type-checked); ``train_overrides`` update ``train``."""
    s = ml_collections.ConfigDict()
    s.kind = kind
    s.description = ""
    s.init = init
    s.init_seed = 0
    # Mesh degrees of this stage; 0 = the pipeline's (e.g. sequence parallelism for the 49k-token run only).
    s.mesh = ml_collections.ConfigDict(dict(data=0, fsdp=0, tensor=0, sequence=0))
    s.transform = ml_collections.ConfigDict(dict(kind="none", num_layers=0, layer_map=[], identity_init=True))
    s.train = train_fields()
    s.train.update(train_overrides)
    s.tokens = 0  # > 0: the stage length in tokens (steps = ceil(tokens / (global_batch * seq_len)))
    s.finalize = ml_collections.ConfigDict(dict(kind="last", num_checkpoints=1, interval=0))
    s.merge = ml_collections.ConfigDict(dict(stages=[], weights=[]))
    return s


def train_fields() -> ml_collections.ConfigDict:
    """The run-config fields a stage may set (run_dir, model and init are the runner's business)."""
    cfg = train_config()
    for key in ("run_dir", "model", "init", "mesh", "mesh_dcn"):
        del cfg[key]
    return cfg


def pipeline_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.name = "pipeline"
    cfg.run_dir = "runs/pipeline"
    # One compilation cache for every stage (apriel_jax.utils.compile_cache): "" = $APRIEL_COMPILE_CACHE or
    # RUN_DIR/compile_cache; "none" = off; else a directory or gs:// URL. Written into each stage's run config.
    cfg.compile_cache = ""
    cfg.base = ""  # the checkpoint stages with init="base" start from (HF, Mistral or apriel-jax directory)
    cfg.model = get_preset("tiny")
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    cfg.mesh_dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=1))
    # Several processes (a pod: every host runs the same command), as for `apriel-jax train`; given to
    # every stage's run config.
    cfg.distributed = ml_collections.ConfigDict(train_config().distributed.to_dict())
    cfg.order = []
    cfg.stages = ml_collections.ConfigDict()
    # Written after the last stage: an HF checkpoint (LlavaForConditionalGeneration layout) of its final, LoRA
    # adapters merged; with peft_dir, a LoRA last stage's adapters also go there in PEFT's layout (their
    # base_model_name_or_path is the stage's init checkpoint).
    cfg.export = ml_collections.ConfigDict(dict(hf_dir="", dtype="", check_with_transformers=True, peft_dir=""))
    # Hardware the production configs are sized for (used by `apriel-jax aot` when no --topology is given).
    cfg.target = ml_collections.ConfigDict(dict(topology=""))
    return cfg


def stage_steps(s) -> int:
    """The stage length in optimizer steps (from ``tokens`` when set)."""
    if s.tokens > 0:
        return max(1, math.ceil(s.tokens / (s.train.data.global_batch * s.train.data.seq_len)))
    return int(s.train.steps)


def validate_pipeline(cfg) -> None:
    """Raise ValueError naming every problem found before anything runs."""
    problems = []
    names = list(cfg.order)
    if not names:
        problems.append("order is empty")
    for n in names:
        if n not in cfg.stages:
            problems.append(f"order names stage {n!r} which is not in stages ({sorted(cfg.stages)})")
    if len(set(names)) != len(names):
        problems.append(f"order repeats a stage: {names}")
    for i, n in enumerate(names):
        if n not in cfg.stages:
            continue
        s = cfg.stages[n]
        where = f"stages.{n}"
        if s.kind not in STAGE_KINDS:
            problems.append(f"{where}.kind={s.kind!r} is not one of {STAGE_KINDS}")
            continue
        if s.kind == "merge":
            problems += _merge_problems(where, s, names[:i])
            lora = [other for other in s.merge.stages if other in cfg.stages and _is_lora_stage(cfg.stages[other])]
            if lora:
                problems.append(f"{where} merges the LoRA stages {lora}, whose finals hold adapters: averaging A "
                                "and B apart is not averaging the updates A @ B")
            continue
        if s.init == "previous" and i == 0:
            problems.append(f"{where}.init='previous' but it is the first stage")
        if s.init == "base" and not cfg.base:
            problems.append(f"{where}.init='base' but the pipeline's base checkpoint (config.base) is not set")
        if s.init.startswith("stage:") and s.init[6:] not in names[:i]:
            problems.append(f"{where}.init={s.init!r} must name an earlier stage of {names[:i]}")
        if s.transform.kind not in TRANSFORMS:
            problems.append(f"{where}.transform.kind={s.transform.kind!r} is not one of {TRANSFORMS}")
        if s.finalize.kind not in FINALIZE:
            problems.append(f"{where}.finalize.kind={s.finalize.kind!r} is not one of {FINALIZE}")
        if s.finalize.kind == "average":
            problems += _average_problems(where, s)
            if _is_lora_stage(s) and s.finalize.num_checkpoints > 1:
                problems.append(f"{where}: finalize='average' of a LoRA stage (train.lora.rank > 0) would average A "
                                "and B apart, which is not the average of the updates A @ B: use finalize='last'")
    if cfg.export.get("peft_dir") and names and names[-1] in cfg.stages and not _is_lora_stage(cfg.stages[names[-1]]):
        problems.append(f"export.peft_dir is set but the last stage {names[-1]!r} trains no LoRA adapters "
                        f"(stages.{names[-1]}.train.lora.rank is 0)")
    if problems:
        raise ValueError("bad pipeline config: " + "; ".join(problems))


def _is_lora_stage(s) -> bool:
    return s.kind == "train" and s.train.lora.rank > 0


def _merge_problems(where, s, earlier) -> list[str]:
    problems = []
    if not s.merge.stages:
        problems.append(f"{where}.merge.stages is empty")
    for other in s.merge.stages:
        if other not in earlier:
            problems.append(f"{where}.merge.stages names {other!r}, which is not an earlier stage of {earlier}")
    if len(s.merge.weights) != len(s.merge.stages):
        problems.append(f"{where}.merge.weights has {len(s.merge.weights)} entries for "
                        f"{len(s.merge.stages)} stages")
    elif s.merge.weights:
        problems += merge_weight_problems(s.merge.weights, where)
    return problems


def merge_weight_problems(weights, where="merge") -> list[str]:
    """Merge weights must be non-negative and sum to 1 (a sum off by more than rounding is a mistake)."""
    problems = []
    if any(w < 0 for w in weights):
        problems.append(f"{where}.weights {list(weights)} has a negative weight")
    if abs(sum(weights) - 1.0) > 1e-6:
        problems.append(f"{where}.weights {list(weights)} sum to {sum(weights):.6g}, not 1")
    return problems


def average_interval(s) -> int:
    """Steps between averaged checkpoints: ``finalize.interval``, or by default the stage length split into
    ``num_checkpoints`` parts, rounded down to a multiple of the checkpoint cadence."""
    if s.finalize.interval > 0:
        return int(s.finalize.interval)
    save_every = s.train.checkpoint.save_every
    return max(save_every, stage_steps(s) // max(1, s.finalize.num_checkpoints) // save_every * save_every)


def averaged_steps(s) -> list[int]:
    """The steps ``finalize=average`` averages: the ``num_checkpoints`` latest multiples of the interval
    (equispaced intermediate checkpoints, as in the paper; the last one is the final step when the stage
    length is a multiple of the interval)."""
    interval = average_interval(s)
    top = stage_steps(s) // interval * interval
    return [top - k * interval for k in reversed(range(s.finalize.num_checkpoints))]


def _average_problems(where, s) -> list[str]:
    n, save_every = s.finalize.num_checkpoints, s.train.checkpoint.save_every
    if n < 1:
        return [f"{where}.finalize.num_checkpoints={n} must be >= 1"]
    interval = average_interval(s)
    if interval % save_every:
        return [f"{where}.finalize.interval={interval} must be a multiple of train.checkpoint.save_every="
                f"{save_every}, or those checkpoints are never written"]
    if averaged_steps(s)[0] < 1:
        return [f"{where}: {n} checkpoints {interval} steps apart need more than {stage_steps(s)} steps"]
    return []
