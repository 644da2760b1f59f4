"""The collectives of a compiled XLA program, per training step, read from its optimized HLO text.

A collective inside a while loop (the scanned layers, the chunked loss, gradient accumulation) runs once
per iteration, so each op is multiplied by the trip counts of every loop around it. Bytes are those of
the whole tensor a collective handles on one chip: the gathered result of an all-gather, the
not-yet-scattered operand of a reduce-scatter, the operand of an all-reduce, an all-to-all or a
collective-permute. For FSDP that is the weight bytes a chip receives and the gradient bytes it reduces.

XLA:TPU writes some reduce-scatters as a fusion around an all-reduce (a computation named
``all-reduce-scatter*``); those count as reduce-scatters. Asynchronous pairs (``*-start`` / ``*-done``)
count once. Trip counts come from the loop's ``known_trip_count`` or from its condition (JAX loops
count from 0 by 1 up to a constant); a loop whose count cannot be read counts once and is reported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
                "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OPCODES = {**{k: k for k in KINDS}, "all-gather-start": "all-gather", "all-reduce-start": "all-reduce",
            "collective-permute-start": "collective-permute", "reduce-scatter-start": "reduce-scatter"}


@dataclass
class CollectiveOp:
    kind: str
    name: str
    dtype: str
    shape: tuple[int, ...]  # the whole tensor's shape (see the module docstring)
    bytes: float  # of that tensor, on one chip
    per_step: int  # executions per step (trip counts multiplied in)
    computation: str


@dataclass
class CollectiveReport:
    ops: list[CollectiveOp] = field(default_factory=list)
    unknown_loops: list[str] = field(default_factory=list)  # loops counted once: trip count not found

    def totals(self) -> dict[str, dict[str, float]]:
        """{kind: {"ops": executions per step, "gb": GB per step}} for every kind, plus "total"."""
        out = {k: {"ops": 0, "gb": 0.0} for k in (*KINDS, "total")}
        for op in self.ops:
            for key in (op.kind, "total"):
                out[key]["ops"] += op.per_step
                out[key]["gb"] += op.per_step * op.bytes / 1e9
        return out


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(text)]


def _nbytes(dtype: str, shape: tuple[int, ...]) -> float:
    return _DTYPE_BYTES[dtype] * math.prod(shape)


def _group_size(attrs: str) -> int:
    """Devices in one replica group, from any of the printed forms."""
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", attrs):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", attrs):
        return int(m.group(1))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs):
        sizes = dict((k.strip("' "), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
    return 1


def _split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    bodies: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            if (m := _HEADER.match(line)) and line.rstrip().endswith("{"):
                current = m.group(1)
                bodies[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            bodies[current].append(line)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return bodies, entry


def _operands(rest: str) -> list[str]:
    """Names of an instruction's operands, from the text after its opcode's opening parenthesis."""
    depth = 0
    for i, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return re.findall(r"%([\w.\-]+)", rest[:i])
            depth -= 1
    return re.findall(r"%([\w.\-]+)", rest)


def _trip_count(operands: list[str], cond: str, body: str, defs: dict) -> int | None:
    """Iterations of a while loop counting ``i`` from its initial value by a constant step while
    ``i < N``: the shape of every JAX scan and fori_loop, and of XLA's windowed-einsum loops."""
    def constant(name):
        opcode, args, _ = defs.get(name, ("", [], ""))
        if opcode == "constant" and re.fullmatch(r"-?\d+", args[0] if args else ""):
            return int(args[0])
        return None

    def index_of(name):  # the tuple element a get-tuple-element reads
        opcode, _, attrs = defs.get(name, ("", [], ""))
        m = re.search(r"index=(\d+)", attrs) if opcode == "get-tuple-element" else None
        return int(m.group(1)) if m else None

    root = defs.get(f"ROOT:{cond}")
    if not root or root[0] != "compare" or "direction=LT" not in root[2] or len(root[1]) != 2:
        return None
    counter, bound = root[1]
    k, limit = index_of(counter), constant(bound)
    if k is None or limit is None:
        return None
    start = 0
    init = defs.get(operands[0]) if operands else None
    if init and init[0] == "tuple" and k < len(init[1]):
        start = constant(init[1][k]) or 0
    step = 1
    body_root = defs.get(f"ROOT:{body}")
    if body_root and body_root[0] == "tuple" and k < len(body_root[1]):
        update = defs.get(body_root[1][k])
        if update and update[0] == "add":
            step = next((c for c in map(constant, update[1]) if c), 1)
    return max(0, -(-(limit - start) // step))


def collectives_per_step(hlo: str) -> CollectiveReport:
    """Every collective of a compiled module (``compiled.as_text()``), counted per execution."""
    bodies, entry = _split_computations(hlo)
    # Each computation's instructions as (value, opcode, the text after the opcode's parenthesis), parsed
    # once; every value's (opcode, operand names or a constant's literal, that text), with
    # "ROOT:<computation>" naming each computation's root; every value's largest array.
    instructions: dict[str, list[tuple[str, str, str]]] = {}
    defs: dict[str, tuple[str, list[str], str]] = {}
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, lines in bodies.items():
        instructions[name] = []
        for line in lines:
            if not (m := _INSTRUCTION.match(line)):
                continue
            value, result, opcode, rest = m.groups()
            instructions[name].append((value, opcode, rest))
            args = [rest.split(")", 1)[0].strip()] if opcode == "constant" else _operands(rest)
            defs[value] = (opcode, args, rest)
            if line.lstrip().startswith("ROOT"):
                defs[f"ROOT:{name}"] = defs[value]
            if arrays := _arrays(result):
                shapes[value] = max(arrays, key=lambda a: _nbytes(*a))
    calls: dict[str, list[tuple[str, int]]] = {name: [] for name in bodies}
    unknown: list[str] = []
    for name, found_here in instructions.items():
        for value, opcode, rest in found_here:
            trips = 1
            if opcode == "while":
                cond = re.search(r"\bcondition=%([\w.\-]+)", rest).group(1)
                body = re.search(r"\bbody=%([\w.\-]+)", rest).group(1)
                known = _TRIP.search(rest)
                found = int(known.group(1)) if known else _trip_count(defs[value][1], cond, body, defs)
                if found is None:
                    unknown.append(value)
                trips = 1 if found is None else found
            for role, callee in _CALLEE.findall(rest):
                calls[name].append((callee, trips if role in ("body", "condition") else 1))
            for group in _BRANCHES.findall(rest):
                calls[name].extend((c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip())

    runs: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        runs[name] = runs.get(name, 0) + times
        for callee, factor in calls.get(name, ()):
            visit(callee, times * factor)

    visit(entry, 1)
    report = CollectiveReport(unknown_loops=unknown)
    for name, found_here in instructions.items():
        if not runs.get(name):
            continue
        for value, opcode, attrs in found_here:
            if opcode not in _OPCODES:
                continue
            kind = _OPCODES[opcode]
            dtype, shape = shapes[value]
            if kind == "reduce-scatter":  # the result is one shard: the whole operand is group-size times it
                dim = int(re.search(r"dimensions=\{(\d+)", attrs).group(1))
                shape = tuple(n * _group_size(attrs) if i == dim else n for i, n in enumerate(shape))
            elif kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"
            report.ops.append(CollectiveOp(kind, value, dtype, shape, _nbytes(dtype, shape), runs[name], name))
    return report
