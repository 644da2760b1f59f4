"""HF -> orbax conversion throughput against plain safetensors reads, with peak memory.

Generates a random HF Llava checkpoint of at least --gb gigabytes (fp32, sharded like transformers
does), then measures, each step in its own subprocess so peak RSS is per step:

  read/safetensors  safetensors.numpy.load_file over every shard, touching all bytes (the baseline)
  read/apriel       our memory-mapped reader over every tensor, touching all bytes
  hf->orbax         apriel_jax.checkpoint.pretrained.hf_to_orbax (validate, stream into arrays, save)
  orbax->hf         apriel_jax.checkpoint.pretrained.orbax_to_hf (restore, stream out, write)

and prints MB/s of checkpoint bytes, the ratio to the baseline read, and peak RSS. On a CPU host the
"device" arrays live in host memory, so conversion RSS includes the model itself once; the column
"minus model" is what the streaming adds on top (target: about one tensor). Reads through memory
maps count the touched file pages as resident while they stay mapped.

    python benchmarks/convert.py --gb 2 --workdir /tmp/convert_bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def bench_config(gb: float):
    """A decoder-heavy model whose fp32 checkpoint is just over ``gb`` GB."""
    from apriel_jax.model import get_preset, param_count

    cfg = get_preset("tiny")
    cfg.decoder.update(vocab_size=32768, hidden_size=2048, intermediate_size=5632, num_heads=16,
                       num_kv_heads=4, head_dim=128)
    cfg.vision.update(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4, head_dim=64)
    layers = 1
    while True:
        cfg.decoder.num_layers = layers
        if param_count(cfg) * 4 >= gb * 1e9:
            return cfg
        layers += 1


def generate(workdir: Path, gb: float) -> Path:
    import jax
    import numpy as np

    from apriel_jax.checkpoint.hf_config import to_hf_config
    from apriel_jax.checkpoint.keymap import expand, key_map
    from apriel_jax.checkpoint.safetensors_io import TensorSpec, write_safetensors_checkpoint
    from apriel_jax.checkpoint.hf_import import abstract_leaves

    cfg = bench_config(gb)
    leaves = abstract_leaves(cfg)
    layers = {"vision": cfg.vision.num_layers, "decoder": cfg.decoder.num_layers, "projector": 0}
    specs = []
    for index, (name, (m, _layer)) in enumerate(sorted(expand(key_map(cfg), layers).items())):
        leaf = leaves[m.path]
        shape = jax.eval_shape(m.to_ext, jax.ShapeDtypeStruct(leaf.shape[1:] if m.stacked else leaf.shape,
                                                             np.float32)).shape

        def produce(shape=shape, seed=index):
            return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02

        specs.append(TensorSpec(name, tuple(shape), np.float32, produce))
    out = workdir / "hf"
    write_safetensors_checkpoint(out, specs, max_shard_bytes=1 << 30,
                                 extra_files={"config.json": json.dumps(to_hf_config(cfg))}, overwrite=True)
    return out


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run_step(step: str, workdir: Path) -> dict:
    """Run one measured step in this process; return seconds, RSS before it and peak RSS."""
    import jax  # noqa: F401  (imported before the start RSS is taken, like everything below)
    import numpy as np  # noqa: F401

    from apriel_jax.checkpoint import pretrained  # noqa: F401

    jax.devices()
    start_rss = _current_rss()
    src = workdir / "hf"
    if step == "read/safetensors":
        import numpy as np
        import safetensors.numpy

        start = time.perf_counter()
        total = 0.0
        for f in sorted(src.glob("*.safetensors")):
            for array in safetensors.numpy.load_file(f).values():
                total += float(np.add.reduce(array, axis=None))
        seconds = time.perf_counter() - start
    elif step == "read/apriel":
        import numpy as np

        from apriel_jax.checkpoint.safetensors_io import SafetensorsCheckpoint

        start = time.perf_counter()
        ckpt = SafetensorsCheckpoint(src)
        total = sum(float(np.add.reduce(ckpt.get(k), axis=None)) for k in ckpt.keys())
        seconds = time.perf_counter() - start
    elif step == "hf->orbax":
        from apriel_jax.checkpoint import pretrained

        shutil.rmtree(workdir / "orbax", ignore_errors=True)
        start = time.perf_counter()
        pretrained.hf_to_orbax(src, workdir / "orbax")
        seconds = time.perf_counter() - start
    elif step == "orbax->hf":
        from apriel_jax.checkpoint import pretrained

        shutil.rmtree(workdir / "hf_back", ignore_errors=True)
        start = time.perf_counter()
        pretrained.orbax_to_hf(workdir / "orbax", workdir / "hf_back", max_shard_bytes=1 << 30)
        seconds = time.perf_counter() - start
    else:
        raise ValueError(step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "start_rss": start_rss, "peak_rss": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size to generate (fp32 GB)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/apriel_convert_bench"))
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(run_step(args.step, args.workdir)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    src = generate(args.workdir, args.gb)
    size = checkpoint_bytes(src)
    largest = max(os.path.getsize(f) for f in src.glob("*.safetensors"))
    print(f"generated {size / 1e9:.2f} GB checkpoint in {time.perf_counter() - t:.0f} s at {src}")

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    results = {}
    for step in ("read/safetensors", "read/apriel", "hf->orbax", "orbax->hf"):
        out = subprocess.run([sys.executable, __file__, "--step", step, "--workdir", str(args.workdir)],
                             env=env, check=True, capture_output=True, text=True).stdout
        results[step] = json.loads(out.strip().splitlines()[-1])

    from apriel_jax.checkpoint.safetensors_io import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(src)
    biggest_tensor = max(ckpt.nbytes(k) for k in ckpt.keys())
    baseline_rate = size / results["read/safetensors"]["seconds"] / 1e6
    print(f"\nmodel bytes {size / 1e9:.2f} GB, largest tensor {biggest_tensor / 1e6:.0f} MB, "
          f"largest shard {largest / 1e9:.2f} GB\n")
    print(f"{'step':18} {'seconds':>8} {'MB/s':>8} {'vs read':>8} {'peak RSS GB':>12} {'peak - start GB':>16} "
          f"{'minus model GB':>15}")
    for step, r in results.items():
        rate = size / r["seconds"] / 1e6
        growth = r["peak_rss"] - r["start_rss"]
        # Conversions hold the model once as (CPU) device arrays; reads hold nothing by design.
        beyond = growth - (size if "orbax" in step else 0)
        print(f"{step:18} {r['seconds']:8.2f} {rate:8.0f} {rate / baseline_rate:8.2f} {r['peak_rss'] / 1e9:12.2f} "
              f"{growth / 1e9:16.2f} {beyond / 1e9:15.2f}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
