#!/usr/bin/env python3
"""Multi-node GPU training under SLURM: writes an sbatch script and submits it.

    python launch/slurm_gpu.py --nodes 4 --gpus-per-node 8 [--tasks per-gpu|per-node] [--partition gpu] \\
        [--setup 'source ~/apriel-jax/.venv/bin/activate'] [--dry-run] \\
        -- apriel-jax train configs/train/tiny_text.py --config.run_dir=/shared/runs/cpt

The package and ``jax[cuda12]`` must be installed where the nodes can use it (``pip install -e
'.[cuda12]'`` into a venv on a shared filesystem; ``--setup`` activates it). The script runs ``srun``
with one task per GPU (default: each task sees only GPU ``$SLURM_LOCALID``) or one task per node (each
task drives all the node's GPUs). Every task is one JAX process: ``apriel_jax.parallel.distributed``
reads ``SLURM_PROCID`` and the srun step's task count, and the coordinator is the first node of the
allocation (``scontrol show hostnames $SLURM_JOB_NODELIST | head -n1``) at ``--port``. Each task writes
``<log-dir>/<job name>-<job id>-task<N>.log``.

Without a program after ``--`` every task runs ``apriel-jax pipeline CONFIG`` (``--pipeline``) followed by
the words after ``--``. ``--dry-run`` prints the sbatch script and the sbatch command; otherwise the script
is written to ``--out`` and submitted.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

# launch/ is not a package: make the sibling helper importable however this file is run or imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_common import (
    COMMAND_EPILOG,
    LaunchError,
    Runner,
    add_pipeline_argument,
    launched_command,
    main_wrapper,
    positive,
    split_command,
)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch/slurm_gpu.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMMAND_EPILOG)
    p.add_argument("--nodes", type=positive, required=True)
    p.add_argument("--gpus-per-node", type=positive, required=True)
    p.add_argument("--tasks", choices=("per-gpu", "per-node"), default="per-gpu",
                   help="JAX processes: one per GPU (default) or one per node")
    p.add_argument("--cpus-per-task", type=positive, default=None, help="default: 8 per GPU of the task")
    p.add_argument("--job-name", default="apriel-jax")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--time", default="24:00:00", help="wall-clock limit, [D-]HH:MM:SS")
    p.add_argument("--port", type=positive, default=8476, help="coordinator port on the first node")
    p.add_argument("--setup", action="append", default=[],
                   help="shell line run before srun (repeatable), e.g. module load / venv activation")
    p.add_argument("--log-dir", default="logs/slurm")
    p.add_argument("--out", default="", help="sbatch script path (default: <log-dir>/<job-name>.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; submit nothing")
    add_pipeline_argument(p)
    return p.parse_args(argv)


def check(args) -> None:
    if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", args.time):
        raise LaunchError(f"--time {args.time!r} must look like HH:MM:SS or D-HH:MM:SS")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.job_name):
        raise LaunchError(f"--job-name {args.job_name!r}: use letters, digits, '_', '.', '-'")
    if not 1 <= args.port <= 65535:
        raise LaunchError(f"--port {args.port} is not a TCP port")


def sbatch_script(args, command: list[str]) -> str:
    per_gpu = args.tasks == "per-gpu"
    tasks_per_node = args.gpus_per_node if per_gpu else 1
    gpus_per_task = 1 if per_gpu else args.gpus_per_node
    cpus = args.cpus_per_task or 8 * gpus_per_task
    train = launched_command(args.pipeline, command)
    log_dir = args.log_dir.rstrip("/") or "."
    directives = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        f"--gpus-per-node={args.gpus_per_node}",
        f"--cpus-per-task={cpus}",
        f"--time={args.time}",
        "--exclusive",
        f"--output={log_dir}/%x-%j.out",
    ]
    directives += [f"--{k}={v}" for k, v in (("partition", args.partition), ("account", args.account),
                                             ("qos", args.qos)) if v]
    # One task per GPU: each process sees only its own GPU, so JAX numbers it device 0 of the process.
    visible = "export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; " if per_gpu else ""
    task = f"{visible}exec {train}"
    lines = ["#!/bin/bash", *[f"#SBATCH {d}" for d in directives], "",
             (f"# {args.nodes} node(s) x {args.gpus_per_node} GPU(s); {args.nodes * tasks_per_node} "
              f"JAX process(es), {gpus_per_task} GPU(s) each."),
             "set -euo pipefail", f"mkdir -p {shlex.quote(log_dir)}", *args.setup, "",
             "# Coordinator: process 0 runs on the first node of the allocation.",
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
             f'export APRIEL_COORDINATOR_ADDRESS="$head_node:{args.port}"',
             'echo "coordinator $APRIEL_COORDINATOR_ADDRESS, $SLURM_NNODES nodes, job $SLURM_JOB_ID"', "",
             (f"srun --nodes={args.nodes} --ntasks-per-node={tasks_per_node} --gpus-per-node={args.gpus_per_node} "
              f"--cpus-per-task={cpus} --kill-on-bad-exit=1 --output={shlex.quote(log_dir)}/%x-%j-task%t.log \\"),
             f"  bash -c {shlex.quote(task)}", ""]
    return "\n".join(lines)


def main(argv) -> int:
    argv, command = split_command(argv)
    args = parse_args(argv)
    check(args)
    script = sbatch_script(args, command)
    out = args.out or f"{args.log_dir.rstrip('/') or '.'}/{args.job_name}.sbatch"
    runner = Runner(args.dry_run)
    if args.dry_run:
        print(f"# {out} (not written: --dry-run)\n{script}")
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        # SLURM opens --output before the script runs: a missing directory fails the job without a log.
        Path(args.log_dir.rstrip("/") or ".").mkdir(parents=True, exist_ok=True)
        Path(out).write_text(script)
        print(f"wrote {out}")
    return runner.run(["sbatch", out])


if __name__ == "__main__":
    sys.exit(main_wrapper(main))
