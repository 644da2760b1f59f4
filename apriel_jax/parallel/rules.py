"""Logical axis names -> mesh axes, in one table.

Model code names what an axis *is* (``embed``, ``heads``, ...); this table decides where it lives on the
mesh. Changing a parallelism strategy is editing this table, not the model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (logical name, mesh axis or tuple of mesh axes or None). Mesh axes absent from the mesh are ignored.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("sequence", "sequence"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("lora_rank", None),  # LoRA adapters' rank: small, never split
)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for a tensor with logical ``axes``; a mesh axis is used at most once per tensor."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in axes:
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1 and t not in used)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def mesh_degree(entry, mesh) -> int:
    """How many devices a PartitionSpec entry (a mesh axis, a tuple of them or None) splits a dimension over."""
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[n] for n in names)


def batch_degree(mesh, rules=DEFAULT_RULES) -> int:
    """How many devices the rows of a batch are split over: the mesh axes of the "batch" logical axis."""
    spec = logical_to_spec(("batch",), mesh, rules)
    return mesh_degree(spec[0] if len(spec) else None, mesh)


def check_divisible(path: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, entry) in enumerate(zip(shape, spec)):
        degree = mesh_degree(entry, mesh)
        if size % degree:
            raise ValueError(
                f"parameter {path}: dimension {dim} of size {size} is sharded over mesh axes {entry} "
                f"of total size {degree}, which does not divide it; change the mesh or the sharding rules"
            )


def tree_shardings(logical_axes_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of logical-axes tuples (leaves: PartitionSpec of logical names)."""

    def one(path, axes, shape_struct):
        spec = logical_to_spec(tuple(axes), mesh, rules)
        check_divisible(jax.tree_util.keystr(path), shape_struct.shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, logical_axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def rules_from_config(entries: Iterable[Sequence] | None):
    """Rules from a config list like [["embed", "fsdp"], ["mlp", ["tensor"]]]; None -> defaults."""
    if not entries:
        return DEFAULT_RULES
    out = []
    for name, target in entries:
        out.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
    return tuple(out)


# The residual stream [B, S, E]: rows over the batch axes; sequence and width replicated.
ACTIVATION_AXES = ("batch", None, None)

_active_rules = [DEFAULT_RULES]


def active_rules() -> tuple:
    """The rules table in effect (the innermost ``use_rules``, else DEFAULT_RULES)."""
    return _active_rules[-1]


@contextlib.contextmanager
def use_rules(rules):
    """Make ``rules`` the table that :func:`constrain` uses while tracing inside this context."""
    _active_rules.append(tuple(rules))
    try:
        yield
    finally:
        _active_rules.pop()


def constrain(x, axes: Sequence[str | None]):
    """Pin ``x`` to the sharding its logical ``axes`` map to on the mesh being traced under, if any.

    Model code calls this at the few places where XLA's sharding propagation needs a hint (scanned
    layer parameters and their gradients, the residual stream). Without an active mesh (``jax.set_mesh``)
    it is the identity, so the model runs unchanged on one device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(tuple(axes), mesh, _active_rules[-1])
    return jax.lax.with_sharding_constraint(x, spec)
