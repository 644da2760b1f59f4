"""Ahead-of-time compile the full Apriel-15B training step for TPU pods from this CPU host.

For each case: describe the TPU topology (libtpu, no TPU needed), shard abstract parameters, optimizer
state and a batch over it, lower and compile the real train step, and print per-chip memory (from the
XLA:TPU compiler: arguments = parameters + optimizer state + batch shard, donated and reused for the
outputs; temp = activations and scratch) against the chip's HBM, the model FLOPs per chip and the compile time.

    python benchmarks/aot.py                       # the default cases
    python benchmarks/aot.py --topology v5p:4x4x4 --seq 8192 --batch 64 --patches 1024 --remat full
"""

from __future__ import annotations

import argparse

from apriel_jax.utils.platform import quiet_libtpu_without_tpu

quiet_libtpu_without_tpu()

from apriel_jax.model import get_preset  # noqa: E402
from apriel_jax.parallel.aot import hbm_per_chip  # noqa: E402
from apriel_jax.train.aot import compile_train_step  # noqa: E402
from apriel_jax.train.optimizer import cosine, make_optimizer  # noqa: E402

DEFAULT_CASES = (
    # topology, mesh degrees, global batch, seq, patches per row, remat
    ("v5p:4x4x4", {"fsdp": 64}, 64, 8192, 1024, "full"),
    ("v5p:4x4x4", {"fsdp": 16, "tensor": 4}, 16, 8192, 1024, "full"),
    ("v6e:16x16", {"fsdp": 256}, 256, 4096, 512, "full"),
)


def compile_case(topology, degrees, batch, seq, patches, remat, preset="apriel_15b"):
    cfg = get_preset(preset)
    cfg.dtype, cfg.param_dtype, cfg.remat_policy = "bfloat16", "float32", remat
    return compile_train_step(cfg, make_optimizer(cosine(5e-5, 10_000)), topology, degrees,
                              batch=batch, seq=seq, patches=patches)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology")
    parser.add_argument("--mesh", default='{"fsdp": -1}', help='degrees as JSON, e.g. {"fsdp": 16, "tensor": 4}')
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--patches", type=int, default=1024)
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()
    import json

    cases = DEFAULT_CASES if not args.topology else (
        (args.topology, json.loads(args.mesh), args.batch, args.seq, args.patches, args.remat),)
    print(f"{'topology':11} {'mesh':24} {'batch x seq':>12} {'patches':>7} {'remat':>6} {'args GB':>8} "
          f"{'temp GB':>8} {'peak GB':>8} {'HBM GB':>7} {'fits':>5} {'TFLOP/chip':>10} {'compile s':>9}")
    for topology, degrees, batch, seq, patches, remat in cases:
        try:
            r, flops = compile_case(topology, degrees, batch, seq, patches, remat)
        except Exception as e:  # an OOM at compile time is a result too
            print(f"{topology:11} {json.dumps(degrees):24} {batch:>5} x {seq:<5} {patches:>7} {remat:>6} "
                  f"FAILED: {str(e).splitlines()[0][:120]}")
            continue
        hbm = hbm_per_chip(topology)
        print(f"{topology:11} {json.dumps(degrees):24} {batch:>5} x {seq:<5} {patches:>7} {remat:>6} "
              f"{r.argument_bytes / 1e9:8.2f} {r.temp_bytes / 1e9:8.2f} {r.peak_bytes / 1e9:8.2f} "
              f"{(hbm or 0) / 1e9:7.0f} {str(r.fits()):>5} {flops / 1e12:10.1f} {r.compile_seconds:9.0f}")


if __name__ == "__main__":
    main()
