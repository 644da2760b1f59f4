"""``apriel-jax pipeline``: run (or plan) a chain of training stages from a pipeline config.

Exit codes: 0 every selected stage finished (and the export, when the last stage ran); 75 a stage was
preempted by SIGTERM (checkpoint saved; rerun the same command to resume); 3 a stage diverged; 65 a stage
skipped more malformed records than data.max_skip_fraction allows; 74 storage
failed mid-stage (the checkpoints already saved are kept; rerun to resume); 2 a bad config or command line
(including missing cloud credentials, a missing bucket or a refused permission, found before any work;
processes started with different configs); 69 a process never reached the coordinator. On several
processes a SIGKILLed process takes the others down with SIGABRT once JAX misses its heartbeats.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

DEFAULT_CONFIG = "apriel_jax.stages.demo"

_EPILOG = """\
config:
  CONFIG is a Python file defining get_config() that returns a pipeline config
  (apriel_jax.stages.config.pipeline_config()); without CONFIG the demo pipeline runs (the whole recipe
  on a tiny model, minutes on a CPU). Override any field after it:
    apriel-jax pipeline --plan
    apriel-jax pipeline configs/pipelines/apriel_15b.py --plan
    apriel-jax pipeline configs/pipelines/demo.py --config.run_dir=/tmp/demo --config.stages.cpt2.train.steps=20
    apriel-jax pipeline configs/pipelines/apriel_15b.py --config.run_dir=gs://BUCKET/runs/apriel
  Finished stages (STAGE/DONE.json) are skipped and an interrupted stage resumes from its last checkpoint:
  rerunning the same command continues where it stopped. run_dir, base and export.hf_dir may be gs:// URLs.
  Compiled programs are kept in RUN_DIR/compile_cache (or $APRIEL_COMPILE_CACHE) for every stage (a rerun
  skips compiling); --config.compile_cache=DIR|gs://... puts them elsewhere, --config.compile_cache=none
  turns it off.

multi-process (multi-host):
  Start the same command in every process (on a pod: every host, with run_dir in a bucket); the layout
  comes from SLURM, TPU metadata or APRIEL_COORDINATOR_ADDRESS / APRIEL_NUM_PROCESSES / APRIEL_PROCESS_ID
  (or --config.distributed.*), see launch/README.md. Process 0 writes markers, summary and plot.

exit codes:
  0 done; 75 preempted (SIGTERM: saved, rerun to resume); 3 a stage diverged (saved); 65 too many malformed
  records skipped (saved); 74 storage failed mid-stage (saved checkpoints kept, rerun to resume); 2 bad
  config, no access to the storage, processes started with different configs or seeing different
  finished stages; 69 a process never reached the coordinator. A process that dies (SIGKILL, a lost host)
  takes the others down once JAX's coordination service misses its heartbeats
  (distributed.heartbeat_timeout_s, 100 s): they abort with SIGABRT (134); rerun the same command everywhere
  to resume.
"""


def add_parser(commands, debug, fmt) -> None:
    p = commands.add_parser(
        "pipeline", parents=[debug], formatter_class=fmt, epilog=_EPILOG,
        help="run the staged training recipe (default: the demo pipeline)",
        description="Run a pipeline of stages: init -> transform -> train -> finalize (average / merge) -> "
                    "export to Hugging Face format. Prints a summary table and writes a PNG of the curves.")
    p.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                   help="pipeline config file (PATH or PATH:ARG); default: the demo pipeline")
    p.add_argument("--plan", action="store_true",
                   help="print the plan (stages, inits, frozen groups with parameter counts, token budgets, "
                        "steps) and exit without running")
    p.add_argument("--only", metavar="STAGE", help="run just this stage (its init must exist)")
    p.add_argument("--from", dest="start", metavar="STAGE", help="run from this stage to the end")
    p.add_argument("--redo", action="store_true",
                   help="delete the selected stages' outputs first and run them again")
    p.add_argument("--no-export", action="store_true", help="do not export the last stage to HF format")
    p.add_argument("--no-fallback", action="store_true",
                   help="stop when a stage's latest checkpoint cannot be restored, instead of resuming from the "
                        "newest intact one (the damaged one is then moved aside)")
    p.set_defaults(handler=_run)


def load_pipeline_config(path: str | None, overrides: list[str]):
    from apriel_jax.utils.config_cli import apply_overrides, load_config_file

    if path is None:
        import importlib

        cfg = importlib.import_module(DEFAULT_CONFIG).get_config()
    else:
        cfg = load_config_file(path)
    apply_overrides(cfg, overrides)
    return cfg


def _run(args, overrides: list[str]) -> int:
    from apriel_jax.cli import UsageError

    # --config.KEY=VALUE overrides were taken out of the command line before argparse (cli.main).
    cfg = load_pipeline_config(args.config, list(overrides))
    if args.no_fallback:
        for name in cfg.order:
            cfg.stages[name].train.checkpoint.fallback = False
    if args.only and args.start:
        raise UsageError("--only and --from exclude each other")

    from apriel_jax import storage
    from apriel_jax.parallel import distributed
    from apriel_jax.stages.report import plan_text
    from apriel_jax.stages.runner import select_stages

    # Before anything touches a JAX backend; a no-op for one process.
    try:
        distributed.initialize(cfg)
        distributed.check_same_config(cfg)
    except ValueError as e:  # an inconsistent process layout, or hosts started with different configs
        raise UsageError(str(e)) from None
    processes = distributed.hosts().count
    uneven = {n: cfg.stages[n].train.data.global_batch for n in cfg.order
              if cfg.stages[n].kind == "train" and cfg.stages[n].train.data.global_batch % processes}
    if uneven:  # found before any stage writes anything (each process packs global_batch / processes rows)
        raise UsageError(f"global_batch of stages {uneven} is not divisible by the {processes} processes")
    storage.preflight(read=[cfg.base])  # the plan reads the base checkpoint's config
    try:
        plan = plan_text(cfg)
        select_stages(cfg, args.only, args.start)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(plan)
    if args.plan:
        return 0
    return run_and_report(cfg, only=args.only, start=args.start, redo=args.redo, export=not args.no_export)


def run_and_report(cfg, *, only=None, start=None, redo=False, export=True) -> int:
    from apriel_jax import storage
    from apriel_jax.stages.report import plot_pipeline, summary_table, write_summary
    from apriel_jax.stages.runner import Runner, StageFailed
    from apriel_jax.train.config import EXIT_CODES
    from apriel_jax.utils import compile_cache

    t0 = time.time()
    compile_cache.share_with_stages(cfg)  # one cache for all stages, before anything compiles
    runner = Runner(cfg)
    try:
        summaries = runner.run(only=only, start=start, redo=redo)
    except StageFailed as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return EXIT_CODES[e.status]
    hosts = runner.hosts  # several processes: process 0 writes the summary and the plot, and checks the export

    def report():
        print()
        print(summary_table(summaries))
        write_summary(cfg, summaries)
        png = plot_pipeline(cfg, storage.location(cfg.run_dir) / "curves.png")
        if png is not None:
            print(f"loss curves: {png}")

    hosts.on_primary("writing the summary", report)
    last_ran = (only or cfg.order[-1]) == cfg.order[-1]
    if export and last_ran:
        out = runner.export()
        print(f"Hugging Face export: {out}")
        adapters = runner.export_adapters()
        if adapters is not None:
            print(f"PEFT adapters: {adapters}")
        if cfg.export.check_with_transformers and hosts.primary:
            print(f"transformers check: {check_export_with_transformers(out)}")
    print(f"pipeline {cfg.name}: done in {time.time() - t0:.0f} s; outputs under {cfg.run_dir}")
    return 0


def check_export_with_transformers(hf_dir) -> str:
    """Load the export with transformers (when torch is installed) and compare its logits with ours. A
    ``gs://`` export is downloaded first, as a user would (transformers reads local directories)."""
    try:
        import torch  # noqa: F401
        from transformers import LlavaForConditionalGeneration  # noqa: F401
    except ImportError as e:
        return f"skipped ({e.name or 'torch/transformers'} not installed)"
    from apriel_jax import storage

    if not storage.is_remote(hf_dir):
        return _compare_with_transformers(hf_dir)
    with tempfile.TemporaryDirectory(prefix="apriel-export-check-") as local:
        download_directory(hf_dir, local)
        return _compare_with_transformers(local)


def download_directory(src, dest) -> None:
    """Make the files directly under ``src`` (local or ``gs://``) appear in the local directory ``dest``:
    links to verified local copies (``storage.local_copies``: size and CRC32C checked, cached)."""
    from apriel_jax import storage

    loc = storage.location(src)
    with storage.storage_errors(loc, "read"):
        files = [p for p in loc.iterdir() if p.is_file()]
    for path, copy in zip(files, storage.paths.local_copies(files)):
        os.symlink(copy, os.path.join(dest, path.name))


def _compare_with_transformers(hf_dir) -> str:
    import numpy as np
    import torch
    from transformers import LlavaForConditionalGeneration

    from apriel_jax.checkpoint.pretrained import from_pretrained
    from apriel_jax.demo import _quiet_transformers, forward_logits

    model = from_pretrained(hf_dir, dtype="float32", param_dtype="float32")
    rng = np.random.default_rng(0)
    ids = rng.integers(20, model.config.decoder.vocab_size, (1, 48))
    ours = forward_logits(model, {"tokens": ids.astype(np.int32), "positions": np.arange(48)[None].astype(np.int32),
                                  "segment_ids": np.ones((1, 48), np.int32)})
    with _quiet_transformers():
        ref_model = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    ref_model.eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.as_tensor(ids), use_cache=False).logits.float().numpy()
    rel = float(np.abs(ref - ours).max() / max(np.abs(ref).max(), 1e-30))
    if rel > 1e-4:
        raise RuntimeError(f"the exported checkpoint disagrees with transformers: max relative logits error {rel:.3g}")
    return f"LlavaForConditionalGeneration loads it; max relative logits error vs ours {rel:.1e}"
