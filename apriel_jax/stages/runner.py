"""Runs a pipeline config stage by stage: init -> transform -> train -> finalize -> next; then export.

Layout under ``run_dir``::

    STAGE/init/       the transformed initial model (upscale), written once before training starts
    STAGE/run/        the training run: checkpoints/, metrics.jsonl, tensorboard/
    STAGE/final/      the stage's result (apriel-jax model directory), the next stage's default init
    STAGE/DONE.json   the stage summary; its presence marks the stage finished
    export/hf/        the last final in Hugging Face format

``run_dir`` (and ``export.hf_dir``, ``base``) may be local or ``gs://`` (``apriel_jax.storage``): a pod
job keeps everything in a bucket and every host runs the same command. Every artifact is written so
that a reader never trusts a half-written one: model directories (``init/``, ``final/``) and the export
behind their marker file, written last (``storage.new_directory``); single files (``DONE.json``,
``summary.json``, ``EXPORTED_FROM.json``) atomically; checkpoints by orbax's own commit protocol.
``DONE.json`` is written only after ``final/`` is complete, and a stage counts as finished (to skip it,
or to start another stage from its ``final/``) only with its ``DONE.json``. So rerunning the same
command skips finished stages and resumes an interrupted one from its latest checkpoint (the training
loop restores the train state and the data iterator, so the resumed run is bit-identical). A stage
stopped by SIGTERM, by repeated non-finite steps or by a storage failure stops the pipeline with that
status.

Several processes (a pod: every host runs the same command, ``parallel.distributed``) run every stage
together on one mesh: each restores, upscales, averages and saves its own shards (host memory stays
near one parameter group), the export gathers one tensor at a time, and process 0 alone writes markers,
``DONE.json``, the summary and the plot, with the others waiting for it (``distributed.Hosts``). Before
starting, the processes check that they see the same finished stages.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import ml_collections

from apriel_jax import storage
from apriel_jax.stages.config import averaged_steps, average_interval, stage_steps, validate_pipeline
from apriel_jax.train.config import train_config

DONE_FILE = "DONE.json"
EXPORT_STAMP = "EXPORTED_FROM.json"
HF_MARKER = "config.json"  # written last by the HF export: an export without it is incomplete


class StageFailed(RuntimeError):
    """A stage ended without completing (preempted, diverged, io_error); ``status`` is the train loop's status."""

    def __init__(self, stage: str, status: str, message: str):
        super().__init__(message)
        self.stage, self.status = stage, status


@dataclass(frozen=True)
class StagePaths:
    root: storage.Location

    @property
    def init(self) -> storage.Location:
        return self.root / "init"

    @property
    def run(self) -> storage.Location:
        return self.root / "run"

    @property
    def final(self) -> storage.Location:
        return self.root / "final"

    @property
    def done(self) -> storage.Location:
        return self.root / DONE_FILE


def stage_paths(cfg, name: str) -> StagePaths:
    return StagePaths(storage.location(cfg.run_dir) / name)


def export_dir(cfg) -> storage.Location:
    return storage.location(cfg.export.hf_dir or storage.location(cfg.run_dir) / "export" / "hf")


def _exists(loc) -> bool:
    with storage.storage_errors(loc, "read"):
        return loc.exists()


def stage_finished(cfg, name: str) -> bool:
    """Whether stage ``name`` finished: its DONE.json, written after its final/, is there."""
    done = stage_paths(cfg, name).done
    with storage.storage_errors(done, "read"):
        return done.is_file()


def select_stages(cfg, only: str | None = None, start: str | None = None) -> list[str]:
    names = list(cfg.order)
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names:
            raise ValueError(f"{flag} {value!r} is not a stage of this pipeline; stages: {names}")
    if only is not None:
        return [only]
    if start is not None:
        return names[names.index(start):]
    return names


def init_stage(cfg, name: str) -> str | None:
    """The earlier stage whose final/ stage ``name`` starts from (None: it starts elsewhere)."""
    s = cfg.stages[name]
    if s.init == "previous":
        return cfg.order[cfg.order.index(name) - 1]
    if s.init.startswith("stage:"):
        return s.init[len("stage:"):]
    return None


def init_source(cfg, name: str) -> str | None:
    """The directory a stage starts from (None: random init from ``cfg.model``)."""
    s = cfg.stages[name]
    if s.init == "random":
        return None
    if s.init == "base":
        return cfg.base
    earlier = init_stage(cfg, name)
    if earlier is not None:
        return str(stage_paths(cfg, earlier).final)
    return s.init


def stage_train_config(cfg, name: str, init_dir: str | None) -> ml_collections.ConfigDict:
    """The run config of ``apriel-jax train`` that trains stage ``name`` starting from ``init_dir``."""
    s = cfg.stages[name]
    tcfg = train_config()
    tcfg.update(s.train.to_dict())
    tcfg.run_dir = str(stage_paths(cfg, name).run)
    tcfg.model = ml_collections.ConfigDict(cfg.model.to_dict())
    tcfg.mesh = ml_collections.ConfigDict(cfg.mesh.to_dict())
    tcfg.mesh.update({k: int(v) for k, v in s.mesh.items() if v})
    tcfg.mesh_dcn = ml_collections.ConfigDict(cfg.mesh_dcn.to_dict())
    tcfg.distributed = ml_collections.ConfigDict(cfg.distributed.to_dict())
    tcfg.init.seed = s.init_seed
    tcfg.init.from_pretrained = init_dir or ""
    tcfg.init.param_dtype, tcfg.init.dtype = cfg.model.param_dtype, cfg.model.dtype
    tcfg.steps = stage_steps(s)
    if s.finalize.kind == "average" and s.finalize.num_checkpoints > 1:
        # The averaged checkpoints are multiples of the interval: keep every one of them.
        tcfg.checkpoint.keep_every = average_interval(s)
    return tcfg


def _read_metrics(run_dir) -> list[dict]:
    from apriel_jax.train.metrics import JSONL_NAME, read_jsonl

    path = run_dir / JSONL_NAME
    return read_jsonl(path) if _exists(path) else []


def _first_last(entries: list[dict], split: str, key: str):
    values = [e[key] for e in entries if e.get("split", "train") == split and e.get(key) is not None]
    return (values[0], values[-1]) if values else (None, None)


def _tokenizer_files(path) -> dict[str, bytes]:
    """Tokenizer files at ``path`` (a file, or a directory such as a stage's final; local or ``gs://``),
    carried into every final and from there into the HF export."""
    path = storage.location(path)
    with storage.storage_errors(path, "read"):
        files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()] if path.is_dir() else []
    return {p.name: storage.read_bytes(p) for p in files
            if p.name.startswith(("tokenizer", "tekken", "special_tokens"))}


def _run_tokenizer_files(tcfg) -> dict[str, bytes]:
    """The tokenizer files of a stage's run config (none for byte-level text)."""
    if not tcfg.data.tokenizer:
        return {}
    from apriel_jax.data.records import resolve_tokenizer_path

    return _tokenizer_files(resolve_tokenizer_path(tcfg.data.tokenizer))


class Runner:
    def __init__(self, cfg, log: Callable[[str], None] = print):
        validate_pipeline(cfg)
        self.cfg, self.log = cfg, log
        self._mesh = None

    @property
    def hosts(self):
        """This process's place in a multi-process job (asked when needed: after distributed.initialize)."""
        from apriel_jax.parallel.distributed import hosts

        return hosts()

    @property
    def mesh(self):
        if self._mesh is None:
            from apriel_jax.parallel.mesh import make_mesh

            self._mesh = make_mesh({k: int(v) for k, v in self.cfg.mesh.items()},
                                   dcn_degrees={k: int(v) for k, v in self.cfg.mesh_dcn.items()})
        return self._mesh

    # ------------------------------------------------------------------------------------ stages

    def run(self, only: str | None = None, start: str | None = None, redo: bool = False) -> list[dict]:
        names = select_stages(self.cfg, only, start)
        # Credentials, buckets and write access before any work (a pod job would otherwise find out
        # after compiling, or only when it writes its first result).
        storage.preflight(write=[self.cfg.run_dir, export_dir(self.cfg)], read=[self.cfg.base])
        if redo:
            self.hosts.on_primary("deleting the stages to redo",
                                  lambda: [storage.remove_tree(stage_paths(self.cfg, n).root) for n in names])
        # Every host must start from the same view: one that sees another set of finished stages (its own
        # local disk instead of the shared bucket, a stale listing) would run other work and hang the job.
        self.hosts.agree("which stages are finished", {n: stage_finished(self.cfg, n) for n in names})
        summaries = []
        for name in names:
            paths = stage_paths(self.cfg, name)
            if stage_finished(self.cfg, name):
                summary = json.loads(storage.read_text(paths.done))
                self.log(f"[{name}] finished earlier ({paths.done}): skipped")
            else:
                summary = self.run_stage(name)
            summaries.append(summary)
        return summaries

    def run_stage(self, name: str) -> dict:
        s, paths = self.cfg.stages[name], stage_paths(self.cfg, name)
        t0 = time.time()
        self.log(f"[{name}] {s.description or s.kind}")
        summary = self._merge(name) if s.kind == "merge" else self._train(name)
        summary["wall_s"] = time.time() - t0  # of this invocation (a resumed stage counts its last part)
        self.hosts.on_primary(f"writing {paths.done}", lambda: storage.write_json(paths.done, summary))
        self.log(f"[{name}] done in {summary['wall_s']:.0f} s -> {paths.final}")
        return summary

    def _init_dir(self, name: str) -> str | None:
        s, paths = self.cfg.stages[name], stage_paths(self.cfg, name)
        source, earlier = init_source(self.cfg, name), init_stage(self.cfg, name)
        if earlier is not None and not stage_finished(self.cfg, earlier):
            raise FileNotFoundError(f"stage {name!r} starts from {source}, the final of stage {earlier!r}, which "
                                    f"has not finished (no {DONE_FILE}): run the earlier stages first")
        if source is not None and not _exists(storage.location(source)):
            raise FileNotFoundError(f"stage {name!r} starts from {source}, which does not exist "
                                    f"(run the earlier stages first, or fix stages.{name}.init)")
        if s.transform.kind == "none":
            return source
        from apriel_jax.checkpoint.orbax_io import is_model_dir

        if not is_model_dir(paths.init):
            self._upscale(name, source, paths.init)
        return str(paths.init)

    def _upscale(self, name: str, source: str | None, out) -> None:
        from flax import nnx

        from apriel_jax.checkpoint.orbax_io import save_model
        from apriel_jax.model import create_model
        from apriel_jax.stages.upscale import default_layer_map, upscale_decoder

        t = self.cfg.stages[name].transform
        if source is None:
            model = create_model(self.cfg.model, seed=self.cfg.stages[name].init_seed, mesh=self.mesh)
        else:
            from apriel_jax.checkpoint.pretrained import from_pretrained

            model = from_pretrained(source, mesh=self.mesh)
        model_cfg = model.config.as_configdict() if hasattr(model.config, "as_configdict") else model.config
        layer_map = list(t.layer_map) or default_layer_map(model_cfg.decoder.num_layers, t.num_layers)
        new_cfg, state = upscale_decoder(nnx.state(model), model_cfg, layer_map, identity_init=t.identity_init)
        self.log(f"[{name}] upscale decoder {model_cfg.decoder.num_layers} -> {len(layer_map)} layers "
                 f"(layer map {layer_map}, identity init {t.identity_init})")
        tcfg = stage_train_config(self.cfg, name, source)
        save_model(state, new_cfg, out, overwrite=True, extra_files=_run_tokenizer_files(tcfg))

    def _train(self, name: str) -> dict:
        from apriel_jax.train.loop import run_trainable, train
        from apriel_jax.train.optimizer import trainable_param_counts
        from apriel_jax.train.task_eval import task_summary

        s, paths = self.cfg.stages[name], stage_paths(self.cfg, name)
        init_dir = self._init_dir(name)
        tcfg = stage_train_config(self.cfg, name, init_dir)
        result = train(tcfg)
        if result["status"] != "completed":
            raise StageFailed(name, result["status"],
                              f"stage {name!r} stopped: {result['status']} at step {result['step']} "
                              "(checkpoint saved; rerun the pipeline to resume)")
        ckpt_dir = storage.location(result["checkpoint_dir"])
        model_cfg, saved = _run_checkpoints(ckpt_dir)
        if s.finalize.kind == "average":
            steps = averaged_steps(s)
            missing = [k for k in steps if k not in saved]
            if missing:
                raise FileNotFoundError(f"stage {name!r}: checkpoints {missing} to average are not in {ckpt_dir}")
        else:
            steps = [int(result["step"])]
        self._average([ckpt_dir / str(k) for k in steps], [1.0 / len(steps)] * len(steps), model_cfg,
                      paths.final, _run_tokenizer_files(tcfg))
        entries = _read_metrics(paths.run)
        loss = _first_last(entries, "train", "loss")
        eval_loss = _first_last(entries, "eval", "loss")
        trainable, frozen = trainable_param_counts(model_cfg, run_trainable(tcfg, model_cfg))
        return dict(stage=name, kind="train", init=init_dir or "random", steps=int(result["step"]),
                    tokens=int(result["step"]) * tcfg.data.global_batch * tcfg.data.seq_len,
                    trainable_params=trainable, frozen_params=frozen, loss_start=loss[0], loss_end=loss[1],
                    eval_loss_start=eval_loss[0], eval_loss_end=eval_loss[1],
                    tasks=task_summary(entries),
                    averaged_steps=steps, final=str(paths.final))

    def _merge(self, name: str) -> dict:
        from apriel_jax.checkpoint.orbax_io import load_config
        from apriel_jax.model import param_count

        s, paths = self.cfg.stages[name], stage_paths(self.cfg, name)
        sources = [stage_paths(self.cfg, other).final for other in s.merge.stages]
        for other, src in zip(s.merge.stages, sources):
            if not stage_finished(self.cfg, other):
                raise FileNotFoundError(f"stage {name!r} merges {src}, the final of stage {other!r}, which has not "
                                        f"finished (no {DONE_FILE}): run those stages first")
        model_cfg = load_config(sources[0])
        extra = _tokenizer_files(sources[0])
        self.log(f"[{name}] merge {list(s.merge.stages)} with weights {list(s.merge.weights)}")
        self._average(sources, list(s.merge.weights), model_cfg, paths.final, extra)
        return dict(stage=name, kind="merge", init=", ".join(s.merge.stages), steps=0, tokens=0,
                    trainable_params=0, frozen_params=param_count(model_cfg), merged=list(s.merge.stages),
                    weights=list(s.merge.weights), final=str(paths.final))

    def _average(self, sources, weights, model_cfg, out, extra_files: dict[str, bytes]) -> None:
        from apriel_jax.stages.averaging import weighted_average

        weighted_average(sources, weights, model_cfg, out, mesh=self.mesh, extra_files=extra_files)

    # ------------------------------------------------------------------------------------ export

    def export(self) -> storage.Location:
        from apriel_jax.checkpoint.pretrained import orbax_to_hf

        last_name = self.cfg.order[-1]
        last = stage_paths(self.cfg, last_name)
        out = export_dir(self.cfg)
        if not stage_finished(self.cfg, last_name):
            raise FileNotFoundError(f"the last stage {last_name!r} has not finished; nothing to export")
        if self._exported_from(out) == str(last.final):
            return out
        orbax_to_hf(last.final, out, dtype=self.cfg.export.dtype or None, overwrite=True, mesh=self.mesh)
        self.hosts.on_primary(f"writing {out / EXPORT_STAMP}",
                              lambda: storage.write_json(out / EXPORT_STAMP, {"source": str(last.final)}))
        self.log(f"exported {last.final} -> {out} (Hugging Face LlavaForConditionalGeneration)")
        return out

    def export_adapters(self) -> storage.Location | None:
        """The last stage's LoRA adapters in PEFT's layout at ``export.peft_dir`` (None when it is not set)."""
        from apriel_jax.checkpoint import orbax_io
        from apriel_jax.checkpoint.peft_adapters import export_peft

        if not self.cfg.export.get("peft_dir"):
            return None
        last_name = self.cfg.order[-1]
        final = stage_paths(self.cfg, last_name).final
        model_cfg = orbax_io.load_config(final)
        state = orbax_io.load_state(final, model_cfg, mesh=self.mesh)
        out = export_peft(state, model_cfg, self.cfg.export.peft_dir, overwrite=True,
                          base_model_name_or_path=init_source(self.cfg, last_name) or "",
                          dtype=self.cfg.export.dtype or None)
        self.log(f"exported the LoRA adapters of {final} -> {out} (PEFT)")
        return out

    @staticmethod
    def _exported_from(out) -> str | None:
        """The final a complete export at ``out`` was made from (None: no complete export there). On GCS
        an overwritten export loses its marker first: a stamp without the marker is a leftover."""
        stamp = out / EXPORT_STAMP
        if not (_exists(stamp) and _exists(out / HF_MARKER)):
            return None
        return json.loads(storage.read_text(stamp)).get("source")


def _run_checkpoints(ckpt_dir) -> tuple[ml_collections.ConfigDict, list[int]]:
    """The model config a run trained (the train loop writes it into every checkpoint's metadata) and the
    steps of its complete checkpoints."""
    from apriel_jax.train.checkpointing import RunCheckpointer

    with RunCheckpointer(ckpt_dir, save_every=1) as ckpt:
        return ml_collections.ConfigDict(ckpt.read_meta()["model_config"]), ckpt.all_steps()
