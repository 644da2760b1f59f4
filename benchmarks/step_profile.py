"""Where the time of one bench_small training step goes on XLA:CPU: a traced step, every executed HLO
thunk attributed to its pass, its kind and the project function that emitted it.

    python benchmarks/step_profile.py [--remat full|attention|none|...] [--chunk 1024] [--top 12]

bench_small is the config of ``benchmarks/train_step.py`` (decoder only, 8 layers, hidden 512, vocab
32768, B=4, S=1024, fp32, AdamW). The step is compiled once; one step after two warm-up steps is traced
with ``jax.profiler`` and each thunk event is matched to its instruction in the optimized HLO:

- pass: forward, recompute (the remat replay inside the backward pass), backward, or update (outside
  the gradient: optimizer, norms);
- kind: matmul (a fusion that holds a dot), transposing (elementwise work that also writes a transposed
  or copied layout, which XLA inserts for a matmul operand), elementwise (everything else);
- source: the innermost frame in apriel_jax, optax or flax that emitted the instruction.

A third table lists the matmuls by operand shapes and contracting dims. Matmul rows show their achieved GFLOP/s against the machine's fp32 matmul peak (a 4096^3
``jnp.dot``, best of 5, measured in the same run). Thunk times are summed over threads, so they can
exceed the step's wall time; the table gives both. On a shared machine compare shares, not seconds.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import numpy as np

from apriel_jax.model import create_model
from apriel_jax.train.optimizer import make_optimizer
from apriel_jax.train.step import init_train_state, make_train_step
from train_step import BETAS, LR, WD, bench_small, make_batch, matmul

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", re.M)
_COMPUTATION = re.compile(r"^%([\w.\-]+) \(.*?\{$(.*?)^\}", re.M | re.S)
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
_OURS = ("apriel_jax/", "optax/", "flax/")


class Hlo:
    """The optimized HLO's instructions, fused computations and source locations, parsed from its text."""

    def __init__(self, text: str):
        self.computations = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(text)}
        self.instructions = {}
        for m in _INSTRUCTION.finditer(text):
            rest = m.group(4)
            calls = re.search(r"calls=%([\w.\-]+)", rest)
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            self.instructions[m.group(1)] = dict(
                shape=m.group(2), opcode=m.group(3), calls=calls and calls.group(1),
                frame=frame and int(frame.group(1)), op_name=op_name.group(1) if op_name else "")
        self.files = self._table(text, "FileNames", r'(\d+) "(.*)"')
        self.functions = self._table(text, "FunctionNames", r'(\d+) "(.*)"')
        self.locations = self._table(text, "FileLocations", r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)")
        self.frames = self._table(text, "StackFrames", r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)")

    @staticmethod
    def _table(text, title, row):
        start = text.find(f"\n{title}\n")
        if start < 0:
            return {}
        out = {}
        for line in text[start + len(title) + 2:].splitlines():
            m = re.match(row, line)
            if not m:
                break
            out[int(m.group(1))] = tuple(int(g) if g.isdigit() else g for g in m.groups()[1:])
        return out

    def source(self, frame_id) -> str:
        """``file:function`` of the innermost frame in the project (or optax/flax), else of the innermost."""
        first, seen = None, set()
        while frame_id in self.frames and frame_id not in seen:
            seen.add(frame_id)
            location, parent = self.frames[frame_id]
            file_id, function_id, line = self.locations.get(location, (0, 0, 0))
            path, function = self.files.get(file_id, ("?",))[0], self.functions.get(function_id, ("?",))[0]
            here = f"{path.split('site-packages/')[-1].split('/work/main/')[-1]}:{function.split('.')[-1]}"
            first = first or here
            if any(mark in path for mark in _OURS):
                return here
            frame_id = parent
        return first or "?"

    def kind(self, name: str) -> str:
        body = self.computations.get(self.instructions[name]["calls"] or "", "")
        if " dot(" in body or self.instructions[name]["opcode"] == "dot":
            return "matmul"
        if re.search(r" (transpose|copy)\(", body) or self.instructions[name]["opcode"] in ("transpose", "copy"):
            return "transposing"  # elementwise work that also changes the layout (writes a transpose)
        return "elementwise"

    def dot(self, name: str) -> tuple[str, float]:
        """(``lhs x rhs`` with contracting dims, FLOPs = 2 x output elements x contracted size) of the
        fusion's dot."""
        body = self.computations.get(self.instructions[name]["calls"] or "", "")
        dot = re.search(r"= (\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)", body)
        if not dot:
            return "", 0.0
        dims = {}
        for operand in (dot.group(2), dot.group(3)):
            m = re.search(rf"%{re.escape(operand)} = \w+\[([\d,]*)\]", body)
            dims[operand] = [int(d) for d in m.group(1).split(",") if d] if m else []
        lhs, rhs = dims[dot.group(2)], dims[dot.group(3)]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}.*?rhs_contracting_dims=\{([\d,]*)\}", dot.group(4))
        if not (lhs and contracting):
            return "", 0.0
        lc = [int(i) for i in contracting.group(1).split(",") if i]
        rc = [int(i) for i in contracting.group(2).split(",") if i]
        out = np.prod([int(d) for d in _SHAPE.match(dot.group(1)).group(1).split(",") if d])
        form = f"{lhs} c{lc} x {rhs} c{rc}"
        return form, 2.0 * out * np.prod([lhs[i] for i in lc])


def phase(op_name: str) -> str:
    if "rematted_computation" in op_name:
        return "recompute"
    if "transpose(" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "update"


def thunk_times(trace_dir: str) -> tuple[dict, dict, float]:
    """(summed µs per thunk name, call counts, step wall µs) from the profiler's perfetto trace."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    total, count, wall = collections.Counter(), collections.Counter(), 0.0
    for e in events:
        if e.get("ph") != "X":
            continue
        if e["name"] == "ThunkExecutor::Execute (wait for completion)":
            wall = max(wall, e.get("dur", 0))
        total[e["name"]] += e.get("dur", 0)
        count[e["name"]] += 1
    return total, count, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remat", default="full", help="model.remat_policy of the step (default full)")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk size of the loss (default 1024)")
    parser.add_argument("--top", type=int, default=12, help="rows of the per-source table")
    args = parser.parse_args()

    cfg = bench_small(False)
    cfg.remat_policy = args.remat
    optimizer = make_optimizer(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD, clip_norm=1.0)
    graphdef, state = init_train_state(create_model(cfg), optimizer)
    step = make_train_step(cfg, graphdef, optimizer, chunk_size=args.chunk, donate=False)
    batch = jax.device_put(make_batch(cfg, False))
    with jax.set_mesh(step.mesh):
        compiled = step.jitted.lower(state, batch).compile()
    hlo = Hlo(compiled.as_text())
    peak_dot = matmul()
    peak = max(2 * 4096**3 / _timed(peak_dot) for _ in range(5))
    for _ in range(2):
        jax.block_until_ready(compiled(state, batch))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        jax.block_until_ready(compiled(state, batch))
        jax.profiler.stop_trace()
        total, count, wall = thunk_times(trace_dir)

    rows = collections.defaultdict(lambda: [0.0, 0.0])  # (pass, kind, source) -> [µs, FLOPs]
    matmuls = collections.defaultdict(lambda: [0.0, 0.0])  # (pass, dot form) -> [µs, FLOPs]
    for name, us in total.items():
        if name not in hlo.instructions:
            continue  # executor bookkeeping, python frames
        inst = hlo.instructions[name]
        kind = hlo.kind(name)
        key = (phase(inst["op_name"]), kind, hlo.source(inst["frame"]))
        rows[key][0] += us
        form, flops = hlo.dot(name) if kind == "matmul" else ("", 0.0)
        rows[key][1] += flops * count[name]
        if form:
            matmuls[(key[0], form)][0] += us
            matmuls[(key[0], form)][1] += flops * count[name]
    thunks = sum(us for us, _ in rows.values())
    print(f"\nbench_small step, remat {args.remat}, loss chunk {args.chunk}: {wall / 1e6:.2f} s wall, "
          f"{thunks / 1e6:.2f} s of thunks (summed over threads); fp32 matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    by = collections.defaultdict(lambda: [0.0, 0.0])
    for (pas, kind, _), (us, fl) in rows.items():
        by[(pas, kind)][0] += us
        by[(pas, kind)][1] += fl
    _table("pass", "kind", by, thunks, peak)
    top = dict(sorted(rows.items(), key=lambda kv: -kv[1][0])[:args.top])
    print()
    _table("pass / kind", "source (innermost project frame)", {(f"{p} {k}", s): v for (p, k, s), v in top.items()},
           thunks, peak)
    print()
    top = dict(sorted(matmuls.items(), key=lambda kv: -kv[1][0])[:args.top])
    _table("pass", "matmul: lhs c[contracting] x rhs c[contracting]", top, thunks, peak)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _table(first: str, second: str, rows: dict, thunks: float, peak: float) -> None:
    print(f"| {first:20s} | {second:52s} | thunk s | share | matmul GFLOP/s (% of peak) |")
    print(f"|{'-' * 22}|{'-' * 54}|---------|-------|----------------------------|")
    for (a, b), (us, fl) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        rate = f"{fl / us / 1e3:7.1f} ({100 * fl / us / 1e3 / (peak / 1e9):3.0f}%)" if fl else ""
        print(f"| {a:20s} | {b[-52:]:52s} | {us / 1e6:7.2f} | {100 * us / thunks:4.1f}% | {rate:26s} |")


if __name__ == "__main__":
    main()
