"""Shared pytest configuration for apriel-jax.

The environment variables below MUST be set before jax is imported anywhere,
which is why they live at module level here (pytest imports conftest.py before
collecting any test module).

* ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: emulate an 8-device
  host so sharding / mesh code can be tested on CPU.  Any other XLA flags that
  were already set are preserved; an existing device-count flag is replaced.
* ``JAX_PLATFORMS=cpu``: never probe for GPU/TPU backends during tests.  Set
  ``APRIEL_TEST_JAX_PLATFORMS`` (e.g. ``cuda``) to run the suite on another
  backend; the CPU-device-count assertions then skip themselves.
* libtpu is installed only for explicit TPU ahead-of-time (AOT) compile tests
  (``jax.experimental.topologies``).  On a CPU host it otherwise tries to query
  the GCE metadata server and complains about missing worker hostnames.  We
  set the harmless knobs that silence that (only if the user has not set
  them); we deliberately do NOT set ``TPU_ACCELERATOR_TYPE`` since AOT tests
  pick their topology explicitly.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import zlib

NUM_CPU_DEVICES = 8

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _configure_environment() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", flags).strip()
    flags = f"{flags} {_DEVICE_COUNT_FLAG}={NUM_CPU_DEVICES}".strip()
    # 8 fake devices share 2 cores: under load a device thread can wait at a collective longer than
    # XLA:CPU's default terminate timeout, and XLA then aborts the whole process (seen in CI as
    # "Fatal Python error: Aborted" inside a sharded train step). Waiting is fine; aborting is not.
    for timeout_flag in ("--xla_cpu_collective_call_terminate_timeout_seconds",
                         "--xla_cpu_collective_timeout_seconds"):
        if timeout_flag not in flags:
            flags = f"{flags} {timeout_flag}=1800"
    # The suite compiles far more than it runs (tiny models, a few steps per test): LLVM's lowest
    # optimization level halves XLA:CPU's compile time (a tiny model's init 10-15 s -> 5 s, its train
    # step 10-15 s -> 7 s on a 2-core host) for slower code that the tests hardly run.
    if "--xla_backend_optimization_level" not in flags:
        flags = f"{flags} --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags
    # XLA:CPU runs every device's program on one shared intra-op thread pool sized max(cores, devices):
    # 8 threads here. A sharded step can block all of them in collectives (a device may have two in
    # flight: one in the top-level program, one inside a scan's while loop) while the participant they
    # wait for is queued behind them: a deadlock, seen in CI inside the 8-device train-step test (thread
    # dump: 8 "XLAEigen" threads in CollectivePermute/AllGather rendezvous). PJRT_NPROC sizes that pool.
    os.environ.setdefault("PJRT_NPROC", "32")

    os.environ["JAX_PLATFORMS"] = os.environ.get("APRIEL_TEST_JAX_PLATFORMS", "cpu")

    # libtpu (AOT compile tests only): do not hit the GCE metadata server and
    # give it a well-formed single-host worker list.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    # AOT tests describe TPU topologies through libtpu, which otherwise holds a machine-wide lock file:
    # a second test run or a benchmark on the same machine would fail on it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    # One persistent compilation cache for the session (apriel_jax.utils.compile_cache reads this variable):
    # the many train and pipeline runs of the same tiny configs, most in subprocesses, read their compiled
    # programs back instead of compiling them again. Tests of the cache itself unset it.
    if "APRIEL_COMPILE_CACHE" not in os.environ:
        cache = tempfile.mkdtemp(prefix="apriel-test-compile-cache-")
        atexit.register(shutil.rmtree, cache, True)
        os.environ["APRIEL_COMPILE_CACHE"] = cache


_configure_environment()

# This process's own compiles use the session's cache from the start too (a train or pipeline run in it
# would turn it on only from then): the many tests that initialise the same tiny model or compile the
# same step read the program back instead of compiling it again.
from apriel_jax.utils import compile_cache as _compile_cache  # noqa: E402

_compile_cache.configure(_compile_cache.resolve("", "."))

# grain (and other absl-based libraries) read absl flags at import/run time and
# raise UnparsedFlagAccessError when pytest, not absl.app, owns the command
# line.  Marking the flags as parsed makes them fall back to their defaults.
from absl import flags as _absl_flags  # noqa: E402

if not _absl_flags.FLAGS.is_parsed():
    _absl_flags.FLAGS.mark_as_parsed()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pytest.ini; registering here keeps `--strict-markers`
    # working when pytest is pointed at a different ini file.
    config.addinivalue_line("markers", "slow: a slow test (deselect with -m 'not slow')")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A numpy Generator seeded deterministically from the test's node id.

    Each test gets its own stream (independent of test ordering), and re-runs
    of the same test see the same numbers.
    """
    seed = zlib.crc32(request.node.nodeid.encode("utf-8"))
    return np.random.default_rng(seed)


# --- Cloud storage: a real GCS JSON API server on loopback (tests/gcs_server.py), shared by the session.
GCS_BUCKET = "apriel-test"


@pytest.fixture(scope="session")
def gcs_server():
    """Start the emulator once and point every GCS client of this process and its children at it.

    ``STORAGE_EMULATOR_HOST`` alone would do (``apriel_jax.storage.gcs`` derives the rest); the derived
    variables are set here too so the fixture does not depend on the code under test.
    """
    from gcs_server import start

    proc, url = start(GCS_BUCKET)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.kill()
        proc.wait()


@pytest.fixture
def gcs_root(gcs_server, request) -> str:
    """A fresh ``gs://`` prefix for one test on the emulator (nothing else writes under it)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    return f"gs://{GCS_BUCKET}/{name}-{zlib.crc32(request.node.nodeid.encode()):08x}"
