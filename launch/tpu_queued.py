#!/usr/bin/env python3
"""Keep a Spot (or queued) Cloud TPU slice training: recreate it after a preemption and run the command again.

    python launch/tpu_queued.py --name apriel-15b --zone us-east5-a --accelerator-type v5p-128 --spot \\
        --pipeline configs/pipelines/apriel_15b.py:gs://BUCKET/apriel-data \\
        -- --config.base=gs://BUCKET/ckpt/pixtral-12b-hf --config.run_dir=gs://BUCKET/runs/apriel-15b

A loop around ``gcloud compute tpus queued-resources``, run from a machine that stays up (a small VM, or a
tmux session): the slice may go at any time, this loop must not.

1. ``describe`` the queued resource. One that is SUSPENDING, SUSPENDED or FAILED (where a preempted Spot
   slice ends up) is deleted with its node (``delete --force``); a missing one is created (``create
   --node-id --accelerator-type --runtime-version [--spot]``).
2. ``describe`` every ``--poll-s`` seconds until it is ACTIVE (it waits in ACCEPTED, WAITING_FOR_RESOURCES or
   PROVISIONING until there is capacity).
3. Install on every worker and run the command there, as ``tpu_pod.py`` does (``--install copy|git|none``,
   ``ssh --worker=all``, a log per worker).
4. Exit 0: done. Exit 2 (bad config or storage access), 3 (diverged) or 65 (bad data) while the slice is
   still ACTIVE: stop with that code, a rerun would repeat it. Any other failure (75 preempted, 74 storage
   failed, 69 a missing process, 255 ssh lost its host) or a slice that is no longer ACTIVE: run the
   command again on the same slice if it is ACTIVE, else go back to 1. At most ``--max-restarts`` times.

The rerun resumes from the last checkpoint: the run directory must be in a bucket (a recreated slice starts
with empty disks), and finished pipeline stages are skipped. Without a program after ``--`` every worker
runs ``apriel-jax pipeline CONFIG`` (``--pipeline``) followed by the words after ``--``. ``--dry-run`` prints
the commands of one pass and the delete that starts the next; nothing runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# launch/ is not a package: make the sibling modules importable however this file is run or imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_common import (
    COMMAND_EPILOG,
    NOT_RESUMABLE_EXIT_CODES,
    LaunchError,
    Runner,
    launched_command,
    main_wrapper,
    split_command,
)
from tpu_pod import (
    ACCELERATOR,
    RUNTIME,
    add_worker_arguments,
    check_name,
    check_worker_arguments,
    install_steps,
    run_step,
)

# States of a queued resource whose slice is gone: it must be deleted before one of that name is created.
LOST = ("SUSPENDING", "SUSPENDED", "FAILED")
MAX_RESTARTS = 10


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch/tpu_queued.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMMAND_EPILOG)
    p.add_argument("--name", required=True, help="queued resource ID")
    p.add_argument("--node-id", default="", help="TPU VM name of the slice (default: --name)")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="", help="default: gcloud's configured project")
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-128, v5litepod-256, v6e-256")
    p.add_argument("--runtime-version", default="", help="TPU VM runtime image (default: by generation)")
    p.add_argument("--spot", action="store_true", help="a Spot slice (preemptible, cheaper)")
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                   help=f"reruns after a failure or a lost slice, each resuming from the last checkpoint "
                        f"(default: {MAX_RESTARTS})")
    p.add_argument("--poll-s", type=float, default=60.0,
                   help="seconds between state checks while the slice is queued or provisioning (default: 60)")
    add_worker_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the commands of one pass; run nothing")
    args = p.parse_args(argv)
    args.node_id = args.tpu = args.node_id or args.name  # tpu_pod's install and run steps address args.tpu
    return args


def check(args) -> None:
    if not ACCELERATOR.match(args.accelerator_type):
        raise LaunchError(f"--accelerator-type must look like v5p-128, v5litepod-256 or v6e-256, "
                          f"got {args.accelerator_type!r}")
    check_name("--name", args.name)
    check_name("--node-id", args.node_id)
    check_worker_arguments(args)
    if args.max_restarts < 0 or args.poll_s <= 0:
        raise LaunchError("--max-restarts must be >= 0 and --poll-s > 0")


def queued_resources(args, *words) -> list[str]:
    argv = ["gcloud", "compute", "tpus", "queued-resources", *words, f"--zone={args.zone}"]
    return argv + ([f"--project={args.project}"] if args.project else [])


def describe(args) -> list[str]:
    return queued_resources(args, "describe", args.name, "--format=value(state.state)")


def create(args) -> list[str]:
    version = args.runtime_version or RUNTIME[args.accelerator_type.split("-")[0]]
    return queued_resources(args, "create", args.name, f"--node-id={args.node_id}",
                            f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}",
                            *(["--spot"] if args.spot else []))


def delete(args) -> list[str]:
    # --force: its node goes too; --quiet: no confirmation prompt in an unattended loop.
    return queued_resources(args, "delete", args.name, "--force", "--quiet")


def state(runner, args) -> str | None:
    """The queued resource's state, or None when it does not exist (or cannot be described)."""
    rc, out = runner.output(describe(args))
    return (out.strip() or None) if rc == 0 else None


def provision(runner, args, sleep) -> int:
    """Bring the queued resource to ACTIVE (delete a lost one, create a missing one, wait); 0, or the exit
    code of the gcloud command that failed."""
    while True:
        now = state(runner, args)
        if now == "ACTIVE":
            return 0
        if now in LOST:
            rc = runner.run(delete(args))
            if rc:
                return rc
            continue  # delete waits for the deletion: create at once
        if now is None:
            rc = runner.run(create(args))
            if rc:
                return rc
        sleep(args.poll_s)  # queued, provisioning, or being deleted


def keep_running(runner, args, command: str, sleep=time.sleep) -> int:
    """Steps 1-4 of the module docstring; the command's last exit code (0 when it finished)."""
    rc = 0
    for attempt in range(args.max_restarts + 1):
        rc = provision(runner, args, sleep)
        if rc:
            print(f"error: gcloud failed with exit code {rc} while bringing up {args.name}", file=sys.stderr)
            return rc
        steps = install_steps(args) + [run_step(args, command)]
        for i, step in enumerate(steps):
            rc = runner.run(step)
            if rc:
                break
        if rc == 0:
            return 0
        now = state(runner, args)
        ran = i == len(steps) - 1
        if now == "ACTIVE" and (not ran or rc in NOT_RESUMABLE_EXIT_CODES):
            print(f"error: the {'command' if ran else 'install'} failed with exit code {rc} on an ACTIVE slice; "
                  "a rerun would not help", file=sys.stderr)
            return rc
        print(f"# attempt {attempt + 1}: exit code {rc}, queued resource {now or 'gone'}: "
              f"{'running again' if now == 'ACTIVE' else 'recreating it'}", flush=True)
    print(f"error: still failing after {args.max_restarts} restarts (exit code {rc})", file=sys.stderr)
    return rc


def print_plan(args, command: str) -> None:
    """What one pass runs, in order, and what a preemption adds (the commands as shell lines)."""
    runner = Runner(dry_run=True)
    print("# the queued resource's state (nothing: create it; SUSPENDING, SUSPENDED or FAILED: delete, then create):")
    runner.output(describe(args))
    runner.run(delete(args))
    runner.run(create(args))
    print(f"# every {args.poll_s:g} s until ACTIVE:")
    runner.output(describe(args))
    print("# install and run on every worker:")
    for step in install_steps(args) + [run_step(args, command)]:
        runner.run(step)
    print(f"# exit 0: done; {', '.join(map(str, NOT_RESUMABLE_EXIT_CODES))} on an ACTIVE slice: stop; otherwise "
          f"run again while ACTIVE, else delete and create (at most {args.max_restarts} restarts)")


def main(argv) -> int:
    argv, command = split_command(argv)
    args = parse_args(argv)
    check(args)
    text = launched_command(args.pipeline, command)
    if args.dry_run:
        print_plan(args, text)
        return 0
    return keep_running(Runner(dry_run=False), args, text)


if __name__ == "__main__":
    sys.exit(main_wrapper(main))
