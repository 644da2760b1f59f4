"""Run a test in a fresh interpreter.

The AOT tests load libtpu (a large native runtime with its own threads) to describe TPU topologies. Kept
in the main pytest process, it stays loaded for every later test, and a full suite run here aborted
("Fatal Python error: Aborted") twice, in runs that had loaded it, and never in runs that had not. Running
those tests in their own interpreter keeps libtpu out of the main process; the test's assertions are
unchanged and its failure output is shown.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys

_FLAG = "APRIEL_ISOLATED_TEST"


def isolated(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        if os.environ.get(_FLAG) == test.__name__:  # we are the child: run the test itself
            return test(*args, **kwargs)
        node = f"{inspect.getfile(test)}::{test.__name__}"
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
            env=dict(os.environ, **{_FLAG: test.__name__}), capture_output=True, text=True,
        )
        if child.returncode != 0:
            raise AssertionError(f"{node} failed in its own interpreter:\n{child.stdout[-6000:]}\n{child.stderr[-3000:]}")
        if " skipped" in child.stdout and " passed" not in child.stdout:
            import pytest

            pytest.skip(f"skipped in its own interpreter: {child.stdout.strip().splitlines()[-1]}")

    return run
