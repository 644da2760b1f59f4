"""Start-up to the first train step with JAX's persistent compilation cache off, cold and warm.

Runs ``apriel-jax train CONFIG`` (default: configs/train/tiny_text.py, a few steps, on CPU) as a fresh
process each time, so nothing is compiled already in memory, and times from the process start to the
first step's log line, plus the first step itself (which includes compiling the train step):

  off      --config.compile_cache=none
  cold     an empty cache directory: every program is compiled and written
  warm     the cache the cold run filled, for a new run directory: every program is read back
  gs cold  / gs warm: the same with the cache on gs:// (--gcs: tests/gcs_server.py on loopback, in its own
           process; its figures measure our request path, not Cloud Storage's latency)

Each row is the best of --repeat runs (a fresh empty cache for every cold run); the ratio column divides
the cold row's start-up by each row's.

    python benchmarks/compile_cache.py [--steps 3] [--repeat 2] [--gcs]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from gcs_server import start as start_server  # noqa: E402  (a GCS API server on loopback)
BUCKET = "bench"
STEP_LINE = re.compile(r"^step 1/\d+ .* step (\d+) ms")



def run_once(args, run_dir: str, cache: str, env: dict) -> tuple[float, float, float]:
    """(seconds to the first step's line, first step ms, total seconds) of one train process."""
    argv = [sys.executable, "-m", "apriel_jax.cli", "train", args.config, f"--config.run_dir={run_dir}",
            f"--config.compile_cache={cache}", f"--config.steps={args.steps}", "--config.eval.every=0",
            "--config.log.tensorboard=false"]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, step_ms, lines = None, None, []
    for line in proc.stdout:
        lines.append(line)
        m = STEP_LINE.match(line)
        if m and first is None:
            first, step_ms = time.perf_counter() - start, float(m.group(1))
    total = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{''.join(lines[-20:])}")
    return first, step_ms, total


def entries(cache: str) -> int:
    if cache.startswith("gs://"):
        from apriel_jax import storage

        return sum(1 for p in storage.location(cache).iterdir() if p.name.endswith("-cache"))
    return sum(1 for p in Path(cache).iterdir() if p.name.endswith("-cache"))


def measure(args, name: str, caches, env: dict, work: str) -> dict:
    """Best of --repeat runs; ``caches(i)`` names the cache of repeat i."""
    best = None
    for i in range(args.repeat):
        cache = caches(i)
        first, step_ms, total = run_once(args, f"{work}/run-{name.replace(' ', '-')}-{i}", cache, env)
        if best is None or first < best[0]:
            best = (first, step_ms, total, entries(cache) if cache != "none" else 0)
    first, step_ms, total, n = best
    print(f"  {name}: first step after {first:.1f} s", file=sys.stderr, flush=True)
    return dict(name=name, first=first, step_ms=step_ms, total=total, entries=n)


def table(rows: list[dict]) -> str:
    cold = next(r for r in rows if r["name"] == "cold")["first"]
    out = [f"{'cache':<9} {'to step 1 (s)':>14} {'step 1 (ms)':>12} {'total (s)':>10} {'entries':>8} "
           f"{'cold/this':>10}"]
    for r in rows:
        out.append(f"{r['name']:<9} {r['first']:>14.2f} {r['step_ms']:>12.0f} {r['total']:>10.2f} "
                   f"{r['entries']:>8} {cold / r['first']:>9.2f}x")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/train/tiny_text.py", help="train config (PATH or PATH:ARG)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest start-up is kept")
    p.add_argument("--gcs", action="store_true", help="also put the cache on gs:// (a loopback GCS server)")
    args = p.parse_args()
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("APRIEL_COMPILE_CACHE", None)  # the rows name their cache explicitly
    rows = []
    with tempfile.TemporaryDirectory(prefix="apriel-compile-cache-") as work:
        rows.append(measure(args, "off", lambda i: "none", env, work))
        rows.append(measure(args, "cold", lambda i: f"{work}/cache-{i}", env, work))
        rows.append(measure(args, "warm", lambda i: f"{work}/cache-0", env, work))
        if args.gcs:
            server, url = start_server(BUCKET)
            try:
                os.environ["STORAGE_EMULATOR_HOST"] = url  # for entries() in this process
                gcs_env = dict(env, STORAGE_EMULATOR_HOST=url)
                root = f"gs://{BUCKET}/compile-cache"
                rows.append(measure(args, "gs cold", lambda i: f"{root}-{i}", gcs_env, work))
                rows.append(measure(args, "gs warm", lambda i: f"{root}-0", gcs_env, work))
            finally:
                server.kill()
                server.wait()
    print(f"{args.config}, {args.steps} steps, JAX_PLATFORMS={env['JAX_PLATFORMS']}, best of {args.repeat}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
