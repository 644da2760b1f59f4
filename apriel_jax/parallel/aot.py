"""Ahead-of-time compilation for TPU topologies from a CPU host (needs ``libtpu`` installed).

``jax.experimental.topologies`` describes a TPU slice (e.g. ``v5p:4x4x4``, 64 chips) without any TPU
attached; jitting against ShapeDtypeStructs sharded over a mesh of those devices and compiling yields
the real XLA:TPU program, its per-chip memory use and its cost analysis. This is how a pod-sized
configuration is checked for fit (HBM) and for sharding mistakes before it ever reaches a pod.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jax.sharding import Mesh

from apriel_jax.parallel.collectives import collectives_per_step
from apriel_jax.parallel.mesh import make_mesh

# HBM per chip in bytes (vendor figures), by topology-name prefix.
HBM_PER_CHIP = {"v4": 32e9, "v5e": 16e9, "v5litepod": 16e9, "v5p": 95e9, "v6e": 32e9}


def host_bounds(topology: str, largest=(2, 2, 1)) -> tuple[int, ...]:
    """Chips per host along each axis: a host holds up to 2x2 chips, and a slice smaller than that (a single
    chip, ``v5e:1x1`` or ``v6e:1x1``, as Colab offers) is one host with all of them."""
    dims = [int(d) for d in topology.split(":")[-1].split("x")]
    dims += [1] * (3 - len(dims))
    return tuple(min(b, d) for b, d in zip(largest, dims))


def topology_devices(topology: str, *, num_slices: int = 1, chips_per_host_bounds=None):
    """The devices of a TPU topology such as ``"v5p:4x4x4"``, ``"v5e:16x16"`` or ``"v6e:1x1"`` (no TPU needed)."""
    from jax.experimental import topologies

    try:
        chips_per_host_bounds = chips_per_host_bounds or host_bounds(topology)
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name="default",
            chips_per_host_bounds=chips_per_host_bounds, num_slices=num_slices,
        )
    except Exception as e:  # libtpu missing or an unknown topology name
        raise RuntimeError(f"cannot describe TPU topology {topology!r} (is libtpu installed?): {e}") from e
    return list(desc.devices)


def topology_mesh(topology: str, degrees: dict[str, int], *, num_slices: int = 1,
                  dcn_degrees: dict[str, int] | None = None) -> Mesh:
    """A mesh with axes data/fsdp/tensor/sequence over a described TPU topology (``num_slices`` slices;
    cross-slice degrees default to ``data`` = num_slices)."""
    devices = topology_devices(topology, num_slices=num_slices)
    if dcn_degrees is None and num_slices > 1:
        dcn_degrees = {"data": num_slices}
    return make_mesh(degrees, devices, dcn_degrees)


def hbm_per_chip(topology: str) -> float | None:
    generation = topology.split(":")[0]
    return HBM_PER_CHIP.get(generation)


@dataclass
class CompileReport:
    topology: str
    chips: int
    argument_bytes: int  # per chip: parameters, optimizer state, batch shards
    output_bytes: int
    temp_bytes: int  # per chip: activations and scratch
    alias_bytes: int  # donated inputs reused as outputs (counted once)
    flops: float | None  # per chip, from XLA's cost analysis
    compile_seconds: float
    mesh_shape: dict = field(default_factory=dict)  # axis name -> size of the mesh compiled for
    # Per step: {kind: {"ops", "gb"}} (parallel.collectives) and "loops_counted_once"; None when the HLO
    # text was unreadable.
    collectives: dict | None = None
    hlo_error: str | None = None  # why the optimized HLO could not be read
    hlo_text: str | None = field(default=None, repr=False)  # the optimized HLO module

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def fits(self) -> bool | None:
        hbm = hbm_per_chip(self.topology)
        return None if hbm is None else self.peak_bytes <= hbm


def report(compiled, topology: str, chips: int, compile_seconds: float) -> CompileReport:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return CompileReport(
        topology=topology, chips=chips,
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
        flops=float(flops) if flops is not None else None, compile_seconds=compile_seconds,
        **_collectives(compiled),
    )


def _collectives(compiled) -> dict:
    try:  # jaxlib must parse the module libtpu returns: it fails when the two are not a matched pair
        text = compiled.as_text()
    except Exception as e:  # noqa: BLE001 - reported beside the memory figures, which are still right
        reason = str(e).splitlines()[0][:200]
        return dict(hlo_error=f"the compiled HLO is unreadable (a jaxlib/libtpu mismatch?): {reason}")
    found = collectives_per_step(text)
    totals = {k: {"ops": v["ops"], "gb": round(v["gb"], 4)} for k, v in found.totals().items()}
    return dict(hlo_text=text, collectives=dict(totals, loops_counted_once=len(found.unknown_loops)))
