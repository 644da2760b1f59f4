#!/usr/bin/env python3
"""Run one command on every worker of a Cloud TPU VM slice (``gcloud compute tpus tpu-vm``).

    python launch/tpu_pod.py --tpu my-v5p --zone us-east5-a [--create --accelerator-type v5p-64] \\
        [--install copy|git|none] [--dry-run] -- apriel-jax train configs/train/tiny_text.py --config.steps=100

Without a program after ``--`` every worker runs ``apriel-jax pipeline CONFIG`` (``--pipeline``) followed
by the words after ``--``. A Spot or queued-resource slice that must be recreated after a preemption:
``tpu_queued.py``.

Steps (each one gcloud command; ``--dry-run`` prints them and runs nothing):

1. ``--create``: ``gcloud compute tpus tpu-vm create`` (skip it to use an existing slice);
2. install on all workers: ``copy`` packs this checkout (``git ls-files``: tracked and untracked-but-not-
   ignored files) into a tarball, ``scp --worker=all`` and unpacks it; ``git`` clones ``--repo-url`` at
   ``--ref`` on every worker. Both then make a venv and ``pip install -e '.[tpu]'``;
3. ``ssh --worker=all`` the command in the checkout's venv. Every worker tees its output to
   ``<remote-dir>/<log-dir>/<run-name>/$(hostname).log`` (one file per worker: TPU VM hostnames end in
   ``-w-<worker>``); ``--detach`` leaves it running under nohup after ssh returns.

The processes find each other through JAX's TPU detection (``distributed.mode=auto`` sees the TPU
device nodes). Worker logs are fetched afterwards with the printed ``scp --worker=all`` command.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
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
    split_command,
)

REPO = Path(__file__).resolve().parents[1]
ACCELERATOR = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-\d+$")
# The TPU VM runtime image of each generation (gcloud's --version).
RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
           "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMMAND_EPILOG)
    p.add_argument("--tpu", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="", help="default: gcloud's configured project")
    p.add_argument("--create", action="store_true", help="create the TPU VM slice first")
    p.add_argument("--accelerator-type", default="", help="with --create, e.g. v5p-64, v5litepod-256, v6e-256")
    p.add_argument("--version", default="", help="with --create: the TPU VM runtime image (default: by generation)")
    p.add_argument("--spot", action="store_true", help="with --create: a Spot slice")
    add_worker_arguments(p)
    p.add_argument("--detach", action="store_true", help="keep the command running after ssh returns (nohup)")
    p.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    return p.parse_args(argv)


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """How the workers get the code, where they log, and what they run (shared with tpu_queued.py)."""
    p.add_argument("--install", choices=("copy", "git", "none"), default="copy",
                   help="copy this checkout (default), clone --repo-url, or use what is installed")
    p.add_argument("--repo-url", default="", help="with --install git")
    p.add_argument("--ref", default="main", help="with --install git: branch, tag or commit")
    p.add_argument("--remote-dir", default="apriel-jax", help="checkout on every worker (relative: under $HOME)")
    p.add_argument("--python", default="python3.11", help="interpreter for the workers' venv (>= 3.11)")
    p.add_argument("--extras", default="tpu", help="pip extras installed on the workers")
    p.add_argument("--log-dir", default="logs", help="worker logs, under --remote-dir when relative")
    p.add_argument("--run-name", default="", help="log subdirectory (default: UTC time)")
    add_pipeline_argument(p)


def check(args) -> None:
    if args.create and not ACCELERATOR.match(args.accelerator_type):
        raise LaunchError(f"--create needs --accelerator-type like v5p-64, v5litepod-256 or v6e-256, "
                          f"got {args.accelerator_type!r}")
    check_worker_arguments(args)
    check_name("--tpu", args.tpu)


def check_worker_arguments(args) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_,-]+", args.extras):
        raise LaunchError(f"--extras {args.extras!r}: comma-separated extra names, e.g. tpu")
    if args.install == "git" and not args.repo_url:
        raise LaunchError("--install git needs --repo-url")


def check_name(flag: str, name: str) -> None:
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise LaunchError(f"{flag} {name!r} is not a valid TPU name (lowercase letters, digits, dashes)")


def gcloud(args, *words) -> list[str]:
    argv = ["gcloud", "compute", "tpus", "tpu-vm", *words, f"--zone={args.zone}"]
    return argv + ([f"--project={args.project}"] if args.project else [])


def ssh_all(args, script: str) -> list[str]:
    return gcloud(args, "ssh", args.tpu, "--worker=all", f"--command={script}")


def venv_install(args) -> str:
    d, py = shlex.quote(args.remote_dir), shlex.quote(args.python)
    # TPU VM images ship an older Python: install the requested one from apt when it is missing.
    return (f"(command -v {py} >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q {py} {py}-venv))"
            f" && cd {d} && {py} -m venv .venv && .venv/bin/pip install -q --upgrade pip && "
            f'.venv/bin/pip install -q -e ".[{args.extras}]"')


def pack_checkout(dry_run: bool) -> str:
    """A tarball of this checkout's files (what git tracks plus untracked files it does not ignore)."""
    tarball = os.path.join(tempfile.gettempdir(), "apriel-jax-checkout.tar.gz")
    if not dry_run:
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                               check=True, capture_output=True).stdout.decode().split("\0")
        files = [f for f in files if f and (REPO / f).exists()]
        subprocess.run(["tar", "-czf", tarball, "-C", str(REPO), "--null", "-T", "-"],
                       input="\0".join(files).encode(), check=True)
    return tarball


def plan(args, command: list[str]) -> list[list[str]]:
    """Every gcloud command of the launch, in order."""
    steps = []
    if args.create:
        version = args.version or RUNTIME[args.accelerator_type.split("-")[0]]
        steps.append(gcloud(args, "create", args.tpu, f"--accelerator-type={args.accelerator_type}",
                            f"--version={version}", *(["--spot"] if args.spot else [])))
    return steps + install_steps(args) + [run_step(args, launched_command(args.pipeline, command), args.detach)]


def install_steps(args) -> list[list[str]]:
    """The gcloud commands that put the code and a venv on every worker of ``args.tpu`` (``--install``)."""
    d = shlex.quote(args.remote_dir)
    if args.install == "copy":
        tarball = pack_checkout(args.dry_run)
        return [gcloud(args, "scp", tarball, f"{args.tpu}:apriel-jax-checkout.tar.gz", "--worker=all"),
                ssh_all(args, f"mkdir -p {d} && tar -xzf apriel-jax-checkout.tar.gz -C {d} && " + venv_install(args))]
    if args.install == "git":
        url, ref = shlex.quote(args.repo_url), shlex.quote(args.ref)
        return [ssh_all(args, f"(test -d {d}/.git || git clone {url} {d}) && cd {d} && git fetch -q origin "
                              f"&& git checkout -q {ref} && cd - >/dev/null && " + venv_install(args))]
    return []


def run_step(args, train: str, detach: bool = False) -> list[str]:
    """``ssh --worker=all`` that runs the shell line ``train`` in the workers' checkout; each worker logs to
    ``<log-dir>/<run-name>/$(hostname).log`` (that directory is left in ``args.logs``); ``detach``: under
    nohup, left running after ssh returns."""
    run_name = args.run_name or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    logs = args.logs = f"{args.log_dir}/{run_name}"
    log = f"{logs}/$(hostname).log"
    prepare = (f"cd {shlex.quote(args.remote_dir)} && mkdir -p {shlex.quote(logs)} && "
               'export PATH="$PWD/.venv/bin:$PATH"')
    if detach:
        script = f"{prepare} && nohup {train} > {log} 2>&1 < /dev/null &"
    else:  # pipefail: ssh reports the command's exit code, not tee's
        script = f"set -o pipefail; {prepare} && {train} 2>&1 | tee {log}"
    return ssh_all(args, script)


def fetch_logs_hint(args) -> str:
    remote_logs = f"{args.remote_dir}/{args.logs}"
    fetch = gcloud(args, "scp", "--recurse", f"{args.tpu}:{remote_logs}", "./tpu-logs", "--worker=all")
    return (f"# worker logs: {remote_logs}/<worker hostname>.log on each worker; fetch them with:\n"
            f"#   {' '.join(fetch)}")


def main(argv) -> int:
    argv, command = split_command(argv)
    args = parse_args(argv)
    check(args)
    runner = Runner(args.dry_run)
    for step in plan(args, command):
        rc = runner.run(step)
        if rc:
            print(f"error: {step[4]} step failed with exit code {rc}", file=sys.stderr)
            return rc
    print(fetch_logs_hint(args))
    return 0


if __name__ == "__main__":
    sys.exit(main_wrapper(main))
