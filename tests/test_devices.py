"""The test environment (tests/conftest.py) must expose 8 host CPU devices."""

import os

import pytest

_ON_CPU = os.environ.get("JAX_PLATFORMS", "") == "cpu"


@pytest.mark.skipif(not _ON_CPU, reason="suite was pointed at a non-CPU backend")
def test_eight_cpu_devices_visible():
    import jax

    devices = jax.devices()
    assert len(devices) == 8
    assert all(d.platform == "cpu" for d in devices)
    assert jax.default_backend() == "cpu"
    assert jax.device_count() == 8
    assert jax.local_device_count() == 8


def test_xla_flags_request_eight_devices():
    flags = os.environ["XLA_FLAGS"].split()
    assert flags.count("--xla_force_host_platform_device_count=8") == 1
    assert not any(
        f.startswith("--xla_force_host_platform_device_count=") and not f.endswith("=8")
        for f in flags
    )


def test_absl_flags_marked_parsed():
    from absl import flags

    assert flags.FLAGS.is_parsed()


def test_rng_fixture_is_seeded_per_test(rng, request):
    import zlib

    import numpy as np

    expected = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
    np.testing.assert_array_equal(rng.integers(0, 2**31, size=4), expected.integers(0, 2**31, size=4))
