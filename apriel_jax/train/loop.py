"""The training loop: ``train(cfg) -> summary`` for a run config (``apriel_jax/train/config.py``).

Resuming: when ``checkpoint.dir`` holds a checkpoint, the train state and the data iterator's state are
restored from the latest one (onto the current mesh, whatever mesh saved it). The data pipeline is
deterministic and the step is a pure function, so a resumed run continues bit-identically.

Stopping early (``summary["status"]`` and the ``apriel-jax train`` exit code, see ``config.EXIT_CODES``):

* ``preempted`` (75): SIGTERM only sets a flag; the step in flight finishes, then the run saves a
  checkpoint at the step boundary and exits. Rerunning the same command resumes.
* ``diverged`` (3): ``max_bad_steps`` consecutive steps had a non-finite loss or gradient. The step
  already dropped those updates; the run saves (the last finite parameters) and exits.
* ``bad_data`` (65): more than ``data.max_skip_fraction`` of the records read so far were malformed and
  skipped (after ``data.skip_check_after`` records; each process checks its own): the run saves and stops,
  naming the counts per reason in one line. Fix the data (or raise the fraction) and rerun to resume.
* ``io_error`` (74): storage failed mid-run (``storage.StorageError``): a data shard that stayed
  unreadable after the data layer's retries, an evaluation batch, or a checkpoint or log that could not
  be written. The run waits for saves in flight, prints one line naming the location and the cause to
  stderr, and stops without saving: the checkpoints already written stay as they are, and rerunning the
  same command once the storage works resumes from the latest.

Storage: ``run_dir`` and ``checkpoint.dir`` may be local or ``gs://`` (``apriel_jax.storage``). Before
anything is built, ``setup`` checks that they can be written and that ``init.from_pretrained`` can be
read (credentials, bucket, permission), so those mistakes cost no compile time. The data files each
source names are expanded once (globs, prepared directories) and recorded in every checkpoint's run
config; a resumed run reads the recorded files. Compiled programs go to JAX's persistent cache
(``compile_cache``, default ``RUN_DIR/compile_cache``; ``apriel_jax.utils.compile_cache``), so a resumed
run reads them back instead of compiling.

Several processes (``apriel_jax.parallel.distributed``): every process runs ``train(cfg)`` with the same
config (checked); each packs only the rows of the global batch its devices hold, and the global batch is
assembled from them. Process 0 writes ``RUN_DIR/metrics.jsonl`` and the console; process i>0 writes its
own metrics (step and data-wait times) to ``RUN_DIR/hosts/process_<i>/``. A storage failure that only
some processes see (each reads its own shards) stops all of them at the same step.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from apriel_jax import storage
from apriel_jax.storage.errors import io_failure, quiet_background_failures
from apriel_jax.data.errors import DataError
from apriel_jax.model import create_model
from apriel_jax.model.factory import adapted_model, merged_model, with_execution
from apriel_jax.model.lora import enabled as lora_enabled
from apriel_jax.model.lora import with_lora
from apriel_jax.model.quant import enabled as quant_enabled
from apriel_jax.model.quant import embeddings_enabled, with_quant
from apriel_jax.parallel import distributed
from apriel_jax.parallel.mesh import make_mesh
from apriel_jax.train.task_eval import TaskEval
from apriel_jax.parallel.rules import batch_degree, logical_to_spec
from apriel_jax.train import inputs
from apriel_jax.train.checkpointing import RunCheckpointer, abstract_like
from apriel_jax.train.config import validate_train_config
from apriel_jax.train.flops import train_step_flops
from apriel_jax.train.loss import chunked_cross_entropy
from apriel_jax.train.metrics import MetricsWriter, mfu, progress_line
from apriel_jax.train.optimizer import cosine, linear_decay, make_optimizer, trainable_for_step
from apriel_jax.train.step import init_train_state, make_train_step
from apriel_jax.utils import compile_cache
from apriel_jax.utils.config_cli import config_to_json


def checkpoint_dir(cfg) -> storage.Location:
    return storage.location(cfg.checkpoint.dir or storage.location(cfg.run_dir) / "checkpoints")


def _check_batch(cfg, mesh) -> None:
    """Fail before any model is built when the global batch cannot be split over the mesh."""
    spec = logical_to_spec(("batch",), mesh)
    entry = spec[0] if len(spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    degree = batch_degree(mesh)
    need = degree * cfg.grad_accum_steps
    if cfg.data.global_batch % need:
        hosts = f" of {jax.process_count()} processes" if jax.process_count() > 1 else ""
        raise ValueError(
            f"data.global_batch={cfg.data.global_batch} does not divide over the mesh: the batch is sharded "
            f"over mesh axes {names} ({degree} devices{hosts}) and split into grad_accum_steps="
            f"{cfg.grad_accum_steps} micro-batches, so it must be a multiple of {need}")


def run_model_config(cfg):
    """The model config a run trains: ``cfg.model`` with the run's quantized base and LoRA adapters (when
    ``quant.mode`` / ``lora.rank`` ask for them)."""
    model_cfg = (with_quant(cfg.model, cfg.quant.mode, cfg.quant.group_size, embeddings_enabled(cfg))
                 if quant_enabled(cfg) else cfg.model)
    return with_lora(model_cfg, cfg.lora) if cfg.lora.rank else model_cfg


def run_trainable(cfg, model_cfg) -> tuple[str, ...]:
    """The trainable patterns a run's step trains on a model with config ``model_cfg``
    (``train/optimizer.trainable_for_step``: image-only parts frozen in a text-only run, only the adapters
    when the model has LoRA adapters)."""
    return trainable_for_step(cfg.trainable, cfg.data.patch_budget, adapters=lora_enabled(model_cfg))


def optimizer_from_config(cfg):
    """The optimizer and learning-rate schedule a run config asks for."""
    o = cfg.optimizer
    if o.schedule == "cosine":
        schedule = cosine(o.peak_lr, cfg.steps, o.warmup_fraction, o.final_lr_fraction)
    else:
        schedule = linear_decay(o.peak_lr, cfg.steps, int(round(o.warmup_fraction * cfg.steps)))
    return make_optimizer(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                          clip_norm=o.clip_norm or None)


def _model(cfg, mesh):
    """(model config, model): random from ``init.seed`` or loaded from ``init.from_pretrained`` (computed with
    ``cfg.model``'s remat and attention settings), with fresh LoRA adapters (from ``init.seed``) when
    ``lora.rank`` > 0. A pretrained model that has adapters of its own (the final of a LoRA stage) starts
    merged: the run begins from the function it computes. A resumed run loads the pretrained weights too
    (simple; they are then replaced by the checkpoint's)."""
    if cfg.init.from_pretrained:
        from apriel_jax.checkpoint.pretrained import from_pretrained

        # A quantized base is quantized as it is read (model/quant.py).
        quant = (dict(quant=cfg.quant.mode, group_size=cfg.quant.group_size,
                      quant_embeddings=embeddings_enabled(cfg)) if quant_enabled(cfg) else {})
        model = merged_model(from_pretrained(cfg.init.from_pretrained, mesh=mesh, **quant,
                                             param_dtype=cfg.init.param_dtype or None, dtype=cfg.init.dtype or None))
        model = with_execution(model, cfg.model)  # the run's remat and attention, whatever the checkpoint says
        if cfg.lora.rank:
            model = adapted_model(model, cfg.lora, seed=cfg.init.seed, mesh=mesh)
        return model.config.as_configdict(), model
    model_cfg = run_model_config(cfg)
    return model_cfg, create_model(model_cfg, seed=cfg.init.seed, mesh=mesh)


def setup(cfg):
    """Everything a run needs, with the train state restored from the latest checkpoint when there is one."""
    validate_train_config(cfg)
    distributed.initialize(cfg)  # before any JAX backend use; a no-op for one process or once initialized
    distributed.check_same_config(cfg)
    storage.preflight(write=[cfg.run_dir, checkpoint_dir(cfg)], read=[cfg.init.from_pretrained])
    compile_cache.configure_for_run(cfg)  # before the first compile: JAX opens the cache then
    mesh = make_mesh({k: int(v) for k, v in cfg.mesh.items()},
                     dcn_degrees={k: int(v) for k, v in cfg.mesh_dcn.items()})
    _check_batch(cfg, mesh)
    ckpt = RunCheckpointer(checkpoint_dir(cfg), save_every=cfg.checkpoint.save_every,
                           keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every or None,
                           async_save=cfg.checkpoint.async_save)
    resume_step = ckpt.latest_step()
    inputs.resolve_data_files(cfg, _recorded_config(ckpt, resume_step))
    # Again with the data files filled in: every process must have expanded the same patterns to the
    # same files (a listing of a bucket changing between processes would split the data otherwise).
    distributed.check_same_config(cfg)
    model_cfg, model = _model(cfg, mesh)
    trainable = run_trainable(cfg, model_cfg)
    optimizer = optimizer_from_config(cfg)
    graphdef, state = init_train_state(model, optimizer, mesh=mesh, trainable=trainable)
    del model
    step_fn = make_train_step(model_cfg, graphdef, optimizer, mesh, trainable=trainable,
                              grad_accum_steps=cfg.grad_accum_steps, chunk_size=cfg.chunk_size,
                              z_loss_weight=cfg.z_loss_weight, lm_head_grad_dtype=cfg.lm_head_grad_dtype or None,
                              dropout_seed=cfg.init.seed)
    data_state, meta = None, {}
    restored = ckpt.restore_latest(abstract_like(state, step_fn.shardings), fallback=cfg.checkpoint.fallback,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    if restored is not None:
        step, state, data_state, meta = restored
        if step != resume_step:  # fell back past damaged checkpoints: read the files that one recorded
            inputs.resolve_data_files(cfg, meta.get("config"))
    return SimpleNamespace(mesh=mesh, model_cfg=model_cfg, graphdef=graphdef, optimizer=optimizer, state=state,
                           step_fn=step_fn, ckpt=ckpt, data_state=data_state or None, meta=meta,
                           trainable=trainable)


def _skip_fraction_problem(cfg, health: dict) -> str | None:
    """The one-line reason to stop when more than data.max_skip_fraction of the records were skipped."""
    try:
        inputs.check_skip_fraction(cfg, health)
    except DataError as err:
        return str(err)
    return None


def _recorded_config(ckpt, step: int | None) -> dict | None:
    """The run config saved with checkpoint ``step`` (None: no checkpoint, or one too damaged to read, in
    which case the restore falls back to an older one and its config is read then)."""
    if step is None:
        return None
    try:
        return ckpt.read_meta(step).get("config")
    except Exception as err:  # noqa: BLE001 - only a damaged checkpoint is tolerated here
        if io_failure(err) is None:
            raise
        return None


def make_eval_step(run):
    """Jitted ``(params, frozen, batch) -> (loss_sum, tokens)``: its own executable, so evaluating never
    retraces or recompiles the train step."""
    sh = run.step_fn.shardings
    batch_sh = NamedSharding(run.mesh, logical_to_spec(("batch",), run.mesh))
    replicated = NamedSharding(run.mesh, PartitionSpec())
    graphdef, compute = run.graphdef, jnp.dtype(run.model_cfg.dtype)

    def eval_step(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        hidden, _ = model.hidden_states(batch)
        loss, count, _ = chunked_cross_entropy(hidden, model.decoder.head(), batch["targets"], batch["loss_mask"],
                                               chunk_size=1024, compute_dtype=compute)
        return loss, count

    return jax.jit(eval_step, in_shardings=(sh.params, sh.frozen, batch_sh), out_shardings=replicated)


def evaluate(cfg, run, eval_step) -> dict:
    """Mean token loss over ``eval.batches`` batches; the same batches every time (fresh iterator)."""
    sources = list(cfg.eval.sources) or list(cfg.data.sources)
    rows = inputs.process_rows(run.mesh, cfg.data.global_batch)
    it = iter(inputs.make_dataset(cfg, sources, cfg.eval.seed, rows))
    total = count = 0.0
    try:
        for _ in range(cfg.eval.batches):
            batch = inputs.to_global(inputs.model_inputs(next(it), cfg.data.patch_budget), run.mesh,
                                     cfg.data.global_batch)
            loss, n = jax.device_get(eval_step(run.state.params, run.state.frozen, batch))
            total, count = total + float(loss), count + float(n)
    finally:
        it.close()
    return {"loss": total / max(count, 1.0), "tokens": count}


class _Preemption:
    """SIGTERM -> a flag read at step boundaries (the handler itself does nothing risky)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _meta(cfg, run, metrics: dict) -> dict:
    return {"config": json.loads(config_to_json(cfg)), "model_config": json.loads(config_to_json(run.model_cfg)),
            "metrics": {k: v for k, v in metrics.items() if v is not None}}


def _host_dir(cfg) -> storage.Location:
    return storage.location(cfg.run_dir) / "hosts" / f"process_{jax.process_index()}"


def _writer(cfg) -> MetricsWriter:
    """Process 0 logs the run; the others log their own step times under RUN_DIR/hosts (no TB, W&B, console)."""
    if jax.process_index() == 0:
        return MetricsWriter(cfg.run_dir, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                             wandb_project=cfg.log.wandb_project, console=cfg.log.console,
                             config=json.loads(config_to_json(cfg)), remote_flush_s=cfg.log.remote_flush_s)
    return MetricsWriter(_host_dir(cfg), tensorboard=False, wandb=False, console=False,
                         remote_flush_s=cfg.log.remote_flush_s)


def _evaluate_and_log(cfg, run, eval_step, task_eval, writer, step: int) -> float:
    scores = {"loss": evaluate(cfg, run, eval_step)["loss"]}
    if task_eval is not None:
        scores.update(task_eval(run.graphdef, run.state.params, run.state.frozen))
    writer.write(step, scores, split="eval")
    writer.print(f"step {step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores["loss"]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


class _StorageFailure:
    """The first ``storage.StorageError`` of the run, and the agreement of all processes on stopping."""

    def __init__(self):
        self.error: BaseException | None = None
        self.message: str | None = None  # set once the processes agreed that one of them failed

    @contextlib.contextmanager
    def catch(self):
        try:
            yield
        except storage.StorageError as err:
            self.error = self.error or err

    def agreed(self) -> bool:
        """Whether any process has failed. A collective: every process calls it at the same points of the
        loop, so a failure that only some processes see (a shard only they read) stops all of them at the
        same step instead of leaving the others waiting in the next step's collectives."""
        if not distributed.any_process(self.error is not None):
            return False
        own = _one_line(self.error) if self.error is not None else ""
        if jax.process_count() == 1:
            self.message = own
        else:  # rare path: say which process failed, and why, on every process
            messages = [m.decode() for m in distributed.allgather_bytes(own.encode())]
            first = next(p for p, m in enumerate(messages) if m)
            self.message = f"{messages[first]} (process {first})"
        return True

    def report(self) -> str | None:
        if self.error is None and self.message is None:
            return None
        return self.message or _one_line(self.error)


def train(cfg) -> dict:
    """Run (or resume) training; returns ``{"status", "step", "loss", "eval_loss", "run_dir", "error", ...}``
    (``error``: the storage failure of an ``io_error`` stop, else None)."""
    quiet_background_failures()
    run = setup(cfg)
    rows = inputs.process_rows(run.mesh, cfg.data.global_batch)  # this process's share of every batch
    it = iter(inputs.make_dataset(cfg, cfg.data.sources, cfg.data.seed, rows))
    if run.data_state is not None:
        it.set_state(inputs.local_data_state(run.data_state, rows))
    writer = _writer(cfg)
    # A debug log: in a bucket it goes up with every checkpoint and at the end, never in between.
    rows_log = (storage.AppendLog(_host_dir(cfg) / "rows.jsonl", upload_every_s=float("inf"))
                if cfg.debug.log_rows else None)
    eval_step = make_eval_step(run) if cfg.eval.every else None
    task_eval = None
    if cfg.eval.every and cfg.eval.task_samples:
        if not cfg.data.tokenizer or not cfg.data.patch_budget:
            raise ValueError("eval.task_samples needs data.tokenizer and a data.patch_budget > 0")
        task_eval = TaskEval(cfg, cfg.eval.tasks, cfg.eval.task_samples)
    devices = run.mesh.devices.flatten()
    device_kind, platform = devices[0].device_kind, devices[0].platform
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    step = start = int(jax.device_get(run.state.step))
    if step:
        writer.print(f"resumed from {checkpoint_dir(cfg)} at step {step}")
    status, bad, last, eval_loss, ema, stop_reason = "completed", 0, {}, None, None, None
    failure = _StorageFailure()
    try:
        with _Preemption() as preemption:
            if eval_step is not None and cfg.eval.at_start and step == 0:
                with failure.catch():
                    eval_loss = _evaluate_and_log(cfg, run, eval_step, task_eval, writer, step)
                if failure.agreed():
                    status = "io_error"
            while status == "completed" and step < cfg.steps:
                t0 = time.perf_counter()
                with failure.catch():
                    run.ckpt.check_for_errors()  # an asynchronous save that failed stops the run now
                    batch = next(it)
                if failure.agreed():  # nothing of this step happened: the latest checkpoint is where to resume
                    status = "io_error"
                    break
                wait = time.perf_counter() - t0
                if rows_log is not None:
                    inputs.log_rows(rows_log, step + 1, rows, batch)
                device_batch = inputs.to_global(inputs.model_inputs(batch, cfg.data.patch_budget), run.mesh,
                                                cfg.data.global_batch)
                run.state, metrics = run.step_fn(run.state, device_batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step += 1
                if cfg.debug.step_sleep_s:
                    time.sleep(cfg.debug.step_sleep_s)
                # From fetching the batch to the step's results: excludes eval, logging and saving.
                step_time = time.perf_counter() - t0
                # The first step of a process includes compilation: keep it out of the ETA average.
                ema = step_time if ema is None or step == start + 2 else 0.9 * ema + 0.1 * step_time
                bad = bad + 1 if metrics["skipped"] else 0
                flops = train_step_flops(run.model_cfg, batch=cfg.data.global_batch, seq_len=cfg.data.seq_len,
                                         image_patch_counts=inputs.image_patch_counts(batch))
                last = dict(metrics, step_time_s=step_time, data_wait_s=wait,
                            tokens_per_s=tokens_per_step / step_time, eta_s=ema * (cfg.steps - step),
                            mfu=mfu(flops, step_time, len(devices), device_kind))
                bad_data = None
                if step % cfg.log.every == 0 or step == cfg.steps:
                    # This process's records read and skipped per reason (no collective): logged, and
                    # checked against data.max_skip_fraction.
                    health = inputs.data_health(it)
                    last.update({f"data/{k}": v for k, v in health.items()})
                    writer.write(step, last)
                    writer.print(progress_line(step, cfg.steps, last, platform=platform))
                    bad_data = _skip_fraction_problem(cfg, health)
                if eval_step is not None and (step % cfg.eval.every == 0 or step == cfg.steps):
                    with failure.catch():
                        eval_loss = _evaluate_and_log(cfg, run, eval_step, task_eval, writer, step)
                    if failure.agreed():
                        status = "io_error"
                        break
                # Every process must stop at the same step: SIGTERM may reach only some of them.
                preempted = distributed.any_process(preemption.requested)
                if bad >= cfg.max_bad_steps:
                    status = "diverged"
                elif cfg.data.max_skip_fraction < 1 and distributed.any_process(bad_data is not None):
                    status, stop_reason = "bad_data", bad_data or "too many records skipped on another process"
                elif preempted:
                    status = "preempted"
                stopping = status != "completed" or step == cfg.steps
                if stopping or run.ckpt.should_save(step):
                    # Gathering the data state is a collective across processes: only when saving.
                    data_state = inputs.global_data_state(it, rows, cfg.data.global_batch)
                    with failure.catch():
                        # The logs go up before the checkpoint starts: whatever checkpoint a resumed run
                        # starts from, the logs already cover every step up to it.
                        writer.flush()
                        if rows_log is not None:
                            rows_log.flush()
                        run.ckpt.save(step, run.state, data_state=data_state, meta=_meta(cfg, run, last),
                                      force=stopping)
                    if failure.agreed():
                        status = "io_error"
                if status != "completed":
                    break
            with failure.catch():  # an asynchronous save still in flight may fail here
                run.ckpt.wait()
    finally:
        # Each closed even when another fails; a storage failure while closing (the last upload of the
        # logs, orbax finishing a save) is the run's failure unless an earlier one was recorded.
        for close in (it.close, writer.close, *([rows_log.close] if rows_log else []), run.ckpt.close):
            with failure.catch():
                close()
    error = failure.report()
    if error is not None:
        status = "io_error"
        print(f"stopped at step {step}: storage failed: {error}; the checkpoints already saved are kept: "
              "rerun the same command to resume once the storage works", file=sys.stderr, flush=True)
    elif status == "diverged":
        writer.print(f"stopped at step {step}: {bad} consecutive steps had a non-finite loss or gradient "
                     f"(updates dropped); checkpoint saved with the last finite parameters")
    elif status == "preempted":
        writer.print(f"preempted (SIGTERM) at step {step}: checkpoint saved; rerun the same command to resume")
    elif status == "bad_data":
        print(f"stopped at step {step}: {stop_reason} (checkpoint saved)", file=sys.stderr, flush=True)
    if last.get("data/skip_fraction"):  # records were skipped: say how many, and why, once at the end
        health = {k[len("data/"):]: v for k, v in last.items() if k.startswith("data/")}
        writer.print(f"data: {inputs.skip_summary(health)}")
    return {"status": status, "step": step, "start_step": start, "loss": last.get("loss"),
            "eval_loss": eval_loss, "run_dir": str(cfg.run_dir), "checkpoint_dir": str(checkpoint_dir(cfg)),
            "error": error}


def load_params(cfg, step: int | None = None) -> dict:
    """{parameter path: numpy array} of a run's checkpoint (default: the latest), e.g. to compare runs."""
    run = setup(cfg)
    try:
        state, _, _ = run.ckpt.restore(abstract_like(run.state, run.step_fn.shardings), step=step)
    finally:
        run.ckpt.close()
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}
