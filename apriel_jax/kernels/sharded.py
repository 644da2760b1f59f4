"""Run a Pallas attention kernel per device inside ``shard_map`` when a mesh is in context.

Mosaic (and Triton) custom calls cannot be partitioned by XLA's SPMD partitioner: under ``jax.jit`` with
sharded inputs they must be called on per-device shards. Attention is independent across rows and heads,
so the kernel runs on local shards with rows split over the batch mesh axes (the ``batch`` logical rule)
and heads split over ``tensor``; no communication is needed. The sequence axis stays whole on every
device (context parallelism would need a ring kernel, which we do not have): a mesh ``sequence`` axis
therefore makes XLA gather the sequence before the kernel.

Without a mesh (``jax.sharding.get_abstract_mesh()`` empty) the kernel is called directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from apriel_jax.parallel import rules


def _axes_for(logical: str, mesh, size: int, extra_divisor: int = 0) -> tuple[str, ...] | None:
    """Mesh axes the logical axis maps to, kept only while their product divides ``size`` (and
    ``extra_divisor``, e.g. the kv-head count when sharding query heads)."""
    spec = rules.logical_to_spec((logical,), mesh, rules.active_rules())  # the rules being traced under
    entry = spec[0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept: list[str] = []
    for name in names:
        degree = math.prod(mesh.shape[n] for n in (*kept, name))
        if size % degree == 0 and (not extra_divisor or extra_divisor % degree == 0):
            kept.append(name)
    return tuple(kept) or None


def run_sharded(kernel: Callable, q, k, v, q_segment_ids, kv_segment_ids):
    """``kernel(q, k, v, q_seg, kv_seg)`` on [B, S, H, D] inputs, per device under a mesh, else directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, q_segment_ids, kv_segment_ids)
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    if manual:  # already inside a shard_map: the inputs are local shards
        return kernel(q, k, v, q_segment_ids, kv_segment_ids)
    batch = _axes_for("batch", mesh, q.shape[0])
    # Heads are sharded only if both query and kv heads divide evenly (GQA groups stay on one device).
    heads = _axes_for("heads", mesh, q.shape[2], extra_divisor=k.shape[2])
    qkv_spec = P(batch, None, heads, None)
    seg_spec = P(batch, None)
    fn = jax.shard_map(kernel, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
                       out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v, q_segment_ids, kv_segment_ids)
