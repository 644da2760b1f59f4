"""Device mesh from config: axes ``data``, ``fsdp``, ``tensor``, ``sequence``; one degree may be -1.

Each axis has an in-slice (ICI) degree and optionally a cross-slice (DCN) degree; the mesh axis size is
their product. Cross-slice links are much slower, so DCN degrees usually go on ``data`` (gradients are
reduced once per step) and in-slice degrees on ``fsdp``/``tensor``.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
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


def make_mesh(degrees: dict[str, int] | None = None, devices=None, dcn_degrees: dict[str, int] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with GSPMD-style (Auto) axes.

    ``degrees`` are the in-slice degrees (one may be -1); ``dcn_degrees`` the cross-slice ones, whose
    product must equal the number of slices. Auto axis types: jax 0.10's ``make_mesh`` defaults to
    Explicit axes, under which scanned layer carries fail to type-check against sharded parameters.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = {name: int((dcn_degrees or {}).get(name, 1)) for name in MESH_AXES}
    if any(d < 1 for d in dcn.values()):
        raise ValueError(f"cross-slice degrees must be >= 1, got {dcn}")
    slices = math.prod(dcn.values())
    if slices == 1:
        resolved = resolve_degrees(degrees or {"fsdp": -1}, len(devices))
        array = np.asarray(devices, dtype=object).reshape(tuple(resolved[name] for name in MESH_AXES))
    else:
        found = sorted({getattr(d, "slice_index", 0) for d in devices})
        if len(found) != slices:
            raise ValueError(f"cross-slice degrees {dcn} multiply to {slices}, but the devices span "
                             f"{len(found)} slice(s)")
        resolved = resolve_degrees(degrees or {"fsdp": -1}, len(devices) // slices)
        array = mesh_utils.create_hybrid_device_mesh(
            [resolved[name] for name in MESH_AXES], [dcn[name] for name in MESH_AXES], devices
        )
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
