"""Quiet libtpu on hosts that have no TPU.

The ``test`` extra installs libtpu (for ahead-of-time TPU compiles on CPU). On a host without TPU chips,
JAX's TPU plugin then probes cloud metadata and prints several lines of initialisation errors on
every start, and its machine-wide lock file makes concurrent AOT compiles fail. When no TPU device
node exists we tell libtpu not to probe and not to lock; on a real TPU VM (device nodes present)
nothing is changed, and explicit user settings always win.
"""

from __future__ import annotations

import glob
import os

_TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def has_tpu_devices() -> bool:
    return any(glob.glob(pattern) for pattern in _TPU_DEVICE_GLOBS)


def quiet_libtpu_without_tpu() -> None:
    """Must run before jax is imported to have an effect."""
    if has_tpu_devices():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    # libtpu takes a machine-wide lock file even when only describing topologies for ahead-of-time
    # compiles; with no TPU to protect, two such processes (two test runs, a benchmark beside a test)
    # must not fail on it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # With neither TPU nor NVIDIA device nodes JAX can only use the CPU; saying so up front keeps the TPU
    # plugin from initialising (and printing "could not determine TPU accelerator type" warnings).
    # Ahead-of-time TPU compiles do not need the TPU backend: they describe topologies through libtpu.
    if not glob.glob("/dev/nvidia[0-9]*"):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
