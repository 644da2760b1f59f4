"""What the launchers share: the command every host runs, the exit codes a rerun cannot fix, the image,
running or printing shell commands, a tiny YAML writer.

The launchers are plain scripts (``python launch/<name>.py``) that need only the standard library on
the machine they run from (a laptop with gcloud / kubectl / sbatch); this module sits next to them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence


# The command every host runs when none follows ``--``: the whole recipe, resumable stage by stage.
DEFAULT_PIPELINE = "configs/pipelines/apriel_15b.py"
# Exit codes of `apriel-jax train` / `pipeline` that a rerun would only repeat: 2 bad config or no access to
# the storage, 3 diverged, 65 too many malformed records (apriel_jax.train.config.EXIT_CODES). Every other
# failure (75 preempted, 74 storage failed mid-run, 69 a missing process, a lost host) is worth a restart:
# the rerun resumes from the last checkpoint.
NOT_RESUMABLE_EXIT_CODES = (2, 3, 65)
DOCKERFILE = "launch/Dockerfile"


class LaunchError(ValueError):
    """A bad launcher argument: reported as one line, exit code 2."""


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, the command to run everywhere) split at the first ``--``."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


COMMAND_EPILOG = ("After --: options of the default command `apriel-jax pipeline CONFIG` (see --pipeline), e.g. "
                  "-- --config.run_dir=gs://BUCKET/runs/apriel-15b, or a whole command that starts with a program, "
                  "e.g. -- apriel-jax train configs/train/tiny_text.py.")


def add_pipeline_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE, metavar="CONFIG",
                        help="pipeline config of the default command `apriel-jax pipeline CONFIG` (PATH or "
                             "PATH:ARG, e.g. configs/pipelines/apriel_15b.py:gs://BUCKET/apriel-data), run when "
                             f"no program follows -- (default: {DEFAULT_PIPELINE})")


def launched_command(pipeline: str, words: list[str]) -> str:
    """The shell line every host runs: the words after ``--`` when they start with a program (``apriel-jax
    train ...``), else ``apriel-jax pipeline PIPELINE`` followed by them (its options and overrides)."""
    if words and not words[0].startswith("-"):
        return shlex.join(words)
    return shlex.join(["apriel-jax", "pipeline", pipeline, *words])


def image_commands(image: str) -> list[list[str]]:
    """Build the container image from this checkout (run at the repository root) and push it."""
    return [["docker", "build", "-f", DOCKERFILE, "-t", image, "."], ["docker", "push", image]]


def shell(argv: Sequence[str]) -> str:
    return shlex.join([str(a) for a in argv])


class Runner:
    """Runs commands, or with ``dry_run`` prints each (one shell line) and runs nothing."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.commands: list[list[str]] = []

    def run(self, argv: Sequence[str], *, log_path=None) -> int:
        argv = [str(a) for a in argv]
        self.commands.append(argv)
        line = shell(argv) + (f"  > {log_path}" if log_path else "")
        if self.dry_run:
            print(line, file=self.out)
            return 0
        print(f"+ {line}", file=self.out, flush=True)
        if log_path is None:
            return subprocess.run(argv, check=False).returncode
        with open(log_path, "w", encoding="utf-8") as log:
            return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode

    def output(self, argv: Sequence[str]) -> tuple[int, str]:
        """(exit code, stdout) of a command whose answer the caller reads, e.g. a resource's state."""
        argv = [str(a) for a in argv]
        self.commands.append(argv)
        if self.dry_run:
            print(shell(argv), file=self.out)
            return 0, ""
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return done.returncode, done.stdout


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def main_wrapper(main):
    """Run ``main(argv)``; a LaunchError becomes ``error: ...`` on stderr and exit code 2."""
    try:
        return main(sys.argv[1:])
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists, strings, numbers and bools. Strings are written as JSON strings,
    which are valid double-quoted YAML scalars, so no value is ever misread (``"on"``, ``"8x8"``, ``"0"``)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:\n{to_yaml(v, indent + 2)}")
            else:
                out.append(f"{pad}{k}: {to_yaml(v).strip()}\n")
        return "".join(out)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        out = []
        for v in value:
            body = to_yaml(v, indent + 2)
            out.append(f"{pad}- {body.lstrip()}" if isinstance(v, (dict, list)) and v else f"{pad}- {body.strip()}\n")
        return "".join(out)
    if isinstance(value, bool):
        return pad + ("true" if value else "false") + "\n"
    if isinstance(value, (int, float)):
        return pad + str(value) + "\n"
    return pad + json.dumps(str(value)) + "\n"
