"""Attention kernels head to head: our Pallas flash kernel vs cuDNN vs plain XLA (and splash on TPU).

Prints forward and forward+backward TFLOP/s for bf16 causal attention at several sequence lengths and
head dims on whatever backend is present, with each kernel's ratio to cuDNN measured in the same run.

FLOPs: forward = 2 matmuls x 2 flops/MAC x B x Hq x D x (visible query-key pairs); causal attention
counts only the S(S+1)/2 visible pairs, not S^2. Forward+backward = 3.5 x forward (the backward's five
matmuls, without counting the kernel's recomputation). Every row is one document (segment id 1), so
the pair count is exact.

    python benchmarks/attention.py            # 4k/8k/16k, head_dim 128 (32/8 heads) and 64 (16/16)
    python benchmarks/attention.py --quick    # tiny sizes; on CPU the kernels run in interpret mode
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from apriel_jax.kernels.attention import attention, resolve_impl

HEADS = {128: (32, 8), 64: (16, 16)}  # head_dim -> (query heads, kv heads): decoder, vision tower


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, causal: bool, backward: bool) -> float:
    pairs = seq * (seq + 1) / 2 if causal else seq * seq
    forward = 4.0 * batch * heads * head_dim * pairs
    return forward * (3.5 if backward else 1.0)


def time_call(fn, *args, iters: int) -> float:
    """Median wall seconds of ``fn(*args)`` after one compile/warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_fns(impl: str, causal: bool):
    def forward(q, k, v, seg):
        return attention(q, k, v, seg, seg, causal=causal, impl=impl)

    def loss(q, k, v, seg):
        return forward(q, k, v, seg).astype(jnp.float32).sum()

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def bench_one(impl: str, batch: int, seq: int, head_dim: int, heads: tuple[int, int], iters: int,
              notes: dict[str, str], causal: bool = True) -> dict:
    hq, hkv = heads
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, seq, hq, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq, hkv, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq, hkv, head_dim), jnp.bfloat16)
    seg = jnp.ones((batch, seq), jnp.int32)
    fwd, fwd_bwd = make_fns(impl, causal)
    result = {}
    for name, fn, backward in (("fwd", fwd, False), ("fwd+bwd", fwd_bwd, True)):
        try:
            seconds = time_call(fn, q, k, v, seg, iters=iters)
        except Exception as e:  # noqa: BLE001  (unsupported shape/backend: show n/a, keep going)
            result[name] = "n/a"
            notes.setdefault(impl, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}")
            continue
        result[name] = attention_flops(batch, seq, hq, head_dim, causal, backward) / seconds / 1e12
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds on CPU, interpret mode)")
    parser.add_argument("--seqs", type=int, nargs="+", default=None)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--tokens", type=int, default=None, help="tokens per call (batch = tokens // seq)")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    seqs = args.seqs or ([128, 256] if args.quick else [4096, 8192, 16384])
    tokens = args.tokens or (256 if args.quick else 16384)
    iters = args.iters or (1 if args.quick else 10)
    impls = ["pallas", "cudnn", "xla"] + (["splash"] if backend == "tpu" else [])
    interpret = backend not in ("tpu", "gpu")
    print(f"backend: {backend} ({jax.devices()[0].device_kind}), bf16, causal, one document per row, "
          f"{tokens} tokens per call, median of {iters}")
    if interpret:
        print("NOTE: on CPU the Pallas kernels run in interpret mode: these numbers are NOT performance "
              "figures, only a check that the benchmark runs.")
        if not args.quick:
            print("NOTE: without --quick, interpret-mode kernels are skipped on CPU (they would take hours).")
            impls = [i for i in impls if i not in ("pallas", "splash")]
    header = f"{'seq':>6} {'D':>4} {'heads':>6} {'impl':>12} {'fwd TF/s':>10} {'x cudnn':>8} {'f+b TF/s':>10} {'x cudnn':>8}"
    print(header)
    print("-" * len(header))
    notes: dict[str, str] = {}
    for head_dim in args.head_dims:
        heads = HEADS.get(head_dim, (4, 2)) if not args.quick else (4, 2)
        for seq in seqs:
            batch = max(1, tokens // seq)
            rows = {}
            for impl in impls:
                probe = jnp.zeros((1, seq, heads[0], head_dim), jnp.bfloat16)
                label = impl if impl != "pallas" else f"pallas({resolve_impl('pallas', probe, probe)[7:]})"
                rows[label] = bench_one(impl, batch, seq, head_dim, heads, iters, notes)
            base = rows.get("cudnn", {})
            for label, res in rows.items():
                cells = []
                for phase in ("fwd", "fwd+bwd"):
                    value, ref = res[phase], base.get(phase)
                    if isinstance(value, float):
                        ratio = f"{value / ref:8.2f}" if isinstance(ref, float) else f"{'-':>8}"
                        cells.append(f"{value:10.3f} {ratio}")
                    else:
                        cells.append(f"{value:>10} {'-':>8}")
                print(f"{seq:>6} {head_dim:>4} {heads[0]:>3}/{heads[1]:<2} {label:>12} " + " ".join(cells))
    for impl, reason in notes.items():
        print(f"n/a {impl}: {reason}")
    if interpret:
        print("(CPU interpret mode: not performance figures.)")


if __name__ == "__main__":
    main()
