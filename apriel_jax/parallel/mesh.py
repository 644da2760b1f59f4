"""Device mesh from config: axes ``data``, ``fsdp``, ``tensor``, ``sequence``; one degree may be -1."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def resolve_degrees(degrees: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill in the one -1 degree and check the product equals the device count (clear error if not)."""
    unknown = [name for name in MESH_AXES if degrees.get(name, 1) == -1]
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {unknown}")
    resolved = {name: int(degrees.get(name, 1)) for name in MESH_AXES}
    for name, d in resolved.items():
        if d == 0 or d < -1:
            raise ValueError(f"mesh axis {name!r} has invalid degree {d}")
    known = math.prod(d for d in resolved.values() if d != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"cannot infer mesh axis {unknown[0]!r}: {num_devices} devices are not divisible by the "
                f"product {known} of the other axes {resolved}"
            )
        resolved[unknown[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"mesh degrees {resolved} multiply to {known}, but there are {num_devices} devices")
    return resolved


def make_mesh(degrees: dict[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all) with GSPMD-style (Auto) axes.

    Auto axis types: jax 0.10's ``make_mesh`` defaults to Explicit axes, under which scanned layer
    carries fail to type-check against sharded parameters.
    """
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_degrees(degrees or {"fsdp": -1}, len(devices))
    shape = tuple(resolved[name] for name in MESH_AXES)
    array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
