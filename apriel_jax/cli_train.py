"""``apriel-jax train`` and ``apriel-jax plot`` (registered by ``cli.build_parser``).

Exit codes of ``train``: 0 completed, 75 preempted by SIGTERM (checkpoint saved; rerun the same command
to resume), 3 stopped after repeated non-finite steps (checkpoint saved), 65 more than
``data.max_skip_fraction`` of the records were malformed (checkpoint saved), 74 storage failed mid-run (a
data shard that stayed unreadable, a checkpoint that could not be written: one line on stderr names the
location; the checkpoints already saved are kept, rerun to resume), 2 bad config or overrides, or
storage that cannot be used at all (no credentials, no such bucket, permission denied: found before
anything is built), 69 a process of a multi-process run never reached the coordinator
(``parallel.distributed``).
"""

from __future__ import annotations

import argparse

_TRAIN_EPILOG = """\
config:
  CONFIG is a Python file defining get_config() (PATH or PATH:ARG), e.g. configs/train/tiny_text.py,
  built on apriel_jax.train.config.train_config(). Override any field after it:
    apriel-jax train configs/train/tiny_text.py --config.run_dir=/tmp/run --config.steps=50
    apriel-jax train configs/train/tiny_text.py --config.mesh.fsdp=2 --config.mesh.data=-1
    apriel-jax train configs/train/tiny_text.py --config.run_dir=gs://BUCKET/runs/tiny
  A run directory with checkpoints is resumed from its latest one. run_dir, checkpoint.dir,
  init.from_pretrained and data paths may be gs:// URLs (credentials: GOOGLE_APPLICATION_CREDENTIALS or
  `gcloud auth application-default login`; a TPU VM's service account).
  Compiled programs are kept in RUN_DIR/compile_cache, or $APRIEL_COMPILE_CACHE when set (JAX's persistent
  cache: a resumed run skips compiling); --config.compile_cache=DIR|gs://... puts them elsewhere,
  --config.compile_cache=none turns it off.

multi-process (multi-host):
  Start the same command in every process; the layout comes from SLURM, TPU metadata or
  APRIEL_COORDINATOR_ADDRESS / APRIEL_NUM_PROCESSES / APRIEL_PROCESS_ID (or --config.distributed.*),
  see launch/README.md.

exit codes:
  0 completed; 75 preempted (SIGTERM: saved, rerun to resume); 3 diverged (non-finite steps: saved);
  65 too many malformed records skipped (data.max_skip_fraction; saved); 74 storage failed mid-run (saved
  checkpoints kept, rerun to resume); 2 bad config, a damaged latest checkpoint with --no-fallback, or no
  access to the storage (credentials, bucket, permission); 69 a process of a multi-process run never
  reached the coordinator.
"""


def add_parsers(commands, debug, fmt) -> None:
    train = commands.add_parser(
        "train", parents=[debug], formatter_class=fmt, epilog=_TRAIN_EPILOG,
        help="train (or resume) from a run config",
        description="Train a model from a run config; metrics go to RUN_DIR (metrics.jsonl, tensorboard/).")
    train.add_argument("--no-fallback", action="store_true",
                       help="stop when the latest checkpoint cannot be restored, instead of resuming from the "
                            "newest intact one (the damaged one is then moved aside); = "
                            "--config.checkpoint.fallback=false")
    train.add_argument("config", metavar="CONFIG", help="run config file (PATH or PATH:ARG)")
    # REMAINDER: --config.x=y overrides are not argparse options; they are parsed by config_cli.
    train.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--config.KEY=VALUE",
                       help="config overrides")
    train.set_defaults(handler=_run_train)

    plot = commands.add_parser(
        "plot", parents=[debug], formatter_class=fmt, help="plot loss / lr / grad-norm curves of a run",
        description="Plot RUN_DIR/metrics.jsonl (train loss, eval loss, learning rate, gradient norm).")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="run directory (holds metrics.jsonl; local or gs://)")
    plot.add_argument("--out", metavar="PNG", help="output image (default: RUN_DIR/curves.png; local or gs://)")
    plot.set_defaults(handler=_run_plot)


def _run_train(args, overrides: list[str]) -> int:
    from apriel_jax.cli import UsageError
    from apriel_jax.utils.config_cli import apply_overrides, load_config_file, split_overrides

    # The flag may also come after CONFIG, where argparse leaves it among the overrides.
    no_fallback = args.no_fallback or "--no-fallback" in args.overrides
    extra, rest = split_overrides([a for a in args.overrides if a != "--no-fallback"])
    if rest:
        raise UsageError(f"unexpected arguments {rest}; overrides look like --config.KEY=VALUE")
    cfg = load_config_file(args.config)
    apply_overrides(cfg, list(overrides) + extra)
    if no_fallback:
        cfg.checkpoint.fallback = False

    from apriel_jax.parallel import distributed

    # Before anything touches a JAX backend (train() calls it too; a no-op once initialized).
    try:
        distributed.initialize(cfg)
    except ValueError as e:  # an incomplete or inconsistent process layout in the config / environment
        raise UsageError(str(e)) from None

    from apriel_jax.train.config import EXIT_CODES
    from apriel_jax.train.loop import train

    try:
        summary = train(cfg)
    except ValueError as e:  # config problems found before training starts (batch vs mesh, sources, ...)
        if type(e) is not ValueError:
            raise
        raise UsageError(str(e)) from None
    print(f"train: {summary['status']} at step {summary['step']} (loss {summary['loss']}); "
          f"run dir {summary['run_dir']}")
    return EXIT_CODES[summary["status"]]


def _run_plot(args, overrides: list[str]) -> int:
    from apriel_jax import storage
    from apriel_jax.train.plot import plot_run

    out = plot_run(args.run_dir, args.out or storage.location(args.run_dir) / "curves.png")
    print(f"plot: wrote {out}")
    return 0
