"""Training-step throughput of apriel-jax vs transformers (torch, CPU) on the reference config ``bench_small``.

bench_small: decoder only, 8 layers, hidden 512, 8 query / 2 kv heads, head_dim 64, MLP 1536, vocab 32768,
sequence 1024, batch 4, fp32, AdamW, remat policy ``attention``. Measured: median step time of 5 steps
after 2 warm-up steps, tokens/s, achieved GFLOP/s (model FLOPs of ``train_step_flops``) and the machine's
fp32 matmul peak (a jitted 4096^3 ``jnp.dot``, best of 5). "vision on" adds a small vision tower fed 2
images of 256x256 (2 x 256 patches) per row; "vision off" feeds no patches (text-only batch).
transformers runs text only. All systems are timed round-robin in one process (one step of each per
round), so load from other processes on a shared machine hits them alike: compare them within one run,
not across runs.

The attention implementation is ``auto`` (what the pipelines use; ``xla_blocked`` on CPU) unless
``--attention`` names another; the table says which one ran.

    python benchmarks/train_step.py [--skip-torch] [--skip-vision] [--attention IMPL]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from apriel_jax.kernels.attention import resolve_impl
from apriel_jax.model import create_model, get_preset
from apriel_jax.train.flops import train_step_flops
from apriel_jax.train.optimizer import make_optimizer
from apriel_jax.train.step import init_train_state, make_train_step

B, S, IMAGES, SIDE = 4, 1024, 2, 16  # images per row, patches per image side (256 px / 16)
LR, WD, BETAS = 1e-4, 0.1, (0.9, 0.95)


def bench_small(vision: bool, attention: str = "auto"):
    cfg = get_preset("tiny")
    cfg.attention_impl = attention
    d = cfg.decoder
    d.vocab_size, d.hidden_size, d.intermediate_size, d.num_layers = 32768, 512, 1536, 8
    d.num_heads, d.num_kv_heads, d.head_dim = 8, 2, 64
    # The fastest policy on XLA:CPU, where memory traffic dominates: full remat that keeps the attention
    # output and log-sum-exp. CPU-seconds per step, one round-robin run on a loaded 2-core host (median
    # of 3): attention 20.2, full 22.2, none 22.8, dots 23.7.
    cfg.remat_policy = "attention"
    if vision:  # a small tower; the decoder is the same either way
        v = cfg.vision
        v.hidden_size, v.intermediate_size, v.num_layers, v.num_heads, v.head_dim = 512, 1536, 4, 8, 64
    return cfg


def make_batch(cfg, vision: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, cfg.decoder.vocab_size, (B, S)).astype(np.int32)
    batch = dict(tokens=tokens, targets=np.roll(tokens, -1, axis=1), loss_mask=np.ones((B, S), np.float32),
                 segment_ids=np.ones((B, S), np.int32), positions=np.tile(np.arange(S, dtype=np.int32), (B, 1)))
    if vision:
        n = SIDE * SIDE
        grid = np.stack(np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij"), -1).reshape(n, 2)
        slots = np.arange(IMAGES * n) + 1  # [IMG] slots right after <s>
        tokens[:, slots] = cfg.image_token_id
        batch.update(
            patches=rng.normal(size=(B, IMAGES * n, 768)).astype(np.float32),
            patch_positions=np.tile(np.concatenate([grid] * IMAGES), (B, 1, 1)).astype(np.int32),
            patch_segment_ids=np.tile(np.repeat(np.arange(1, IMAGES + 1), n), (B, 1)).astype(np.int32),
            patch_token_index=np.tile(slots, (B, 1)).astype(np.int32),
        )
    return batch


def jax_step(vision: bool, attention: str):
    """(one-step callable, model FLOPs of a step)."""
    cfg = bench_small(vision, attention)
    optimizer = make_optimizer(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD, clip_norm=1.0)
    graphdef, state = init_train_state(create_model(cfg), optimizer)
    step = make_train_step(cfg, graphdef, optimizer, chunk_size=1024)
    batch = jax.device_put(make_batch(cfg, vision))
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics)

    patches = [SIDE * SIDE] * (IMAGES * B) if vision else []
    return run, train_step_flops(cfg, batch=B, seq_len=S, image_patch_counts=patches)


def torch_step():
    """One-step callable of transformers' model."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    d = bench_small(False).decoder
    config = MistralConfig(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                           num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
                           num_key_value_heads=d.num_kv_heads, head_dim=d.head_dim, rope_theta=d.rope_theta,
                           tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MistralForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    ids = torch.from_numpy(make_batch(bench_small(False), False)["tokens"]).long()

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def matmul():
    """One jitted 4096^3 fp32 ``jnp.dot`` (2 x 4096^3 FLOPs)."""
    a = jnp.ones((4096, 4096), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    return lambda: jax.block_until_ready(dot(a, a))


def interleaved(fns: dict, warmup=2, repeats=5) -> dict:
    """Per-callable step times, measured round-robin (one call of each per round) so that load from other
    processes on a shared machine hits every system alike; returns the lists of times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-vision", action="store_true")
    parser.add_argument("--attention", default="auto", help="attention impl(s) of the apriel-jax runs, comma-separated (default auto); "
                        "the first is compared with transformers")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    args = parser.parse_args()
    d = bench_small(False).decoder
    shape = lambda h: jax.ShapeDtypeStruct((B, S, h, d.head_dim), jnp.float32)  # noqa: E731
    runs = {}  # name -> (attention impl, FLOPs)
    fns = {"peak": matmul()}
    for attention in args.attention.split(","):  # the first one is compared with transformers
        impl = resolve_impl(attention, shape(d.num_heads), shape(d.num_kv_heads))
        label = "" if attention == args.attention else f" [{attention}]"
        fns[name := f"apriel-jax, vision off{label}"], flops = jax_step(False, attention)
        runs[name] = (impl, flops)
        if not args.skip_vision:
            fns[name := f"apriel-jax, vision on (2x256 patches/row){label}"], flops_v = jax_step(True, attention)
            runs[name] = (impl, flops_v)
    if not args.skip_torch:
        fns["transformers MistralForCausalLM (sdpa)"] = torch_step()
        runs["transformers MistralForCausalLM (sdpa)"] = ("sdpa", flops)
    times = interleaved(fns, repeats=args.repeats)
    peak = 2 * 4096**3 / min(times.pop("peak"))  # best round: the machine's peak, not its load
    rows = [(name, attn, statistics.median(times[name]), fl) for name, (attn, fl) in runs.items()]
    t = rows[0][2]  # apriel-jax, vision off, first attention impl
    print(f"\nbench_small: B={B} S={S}, fp32, AdamW; {jax.devices()[0].device_kind}, "
          f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    print(f"| {'run':44s} | attention   | step s | tokens/s | GFLOP/s | % of matmul peak |")
    print(f"|{'-' * 46}|-------------|--------|----------|---------|------------------|")
    for name, attn, seconds, fl in rows:
        print(f"| {name:44s} | {attn:11s} | {seconds:6.2f} | {B * S / seconds:8.0f} | {fl / seconds / 1e9:7.1f} | "
              f"{100 * fl / seconds / peak:15.1f}% |")
    if not args.skip_torch:
        print(f"\napriel-jax / transformers speed (vision off): {rows[-1][2] / t:.2f}x")
        for name, attn, seconds, _ in rows[1:-1]:
            if "vision off" in name:
                print(f"  {name} / transformers: {rows[-1][2] / seconds:.2f}x")


if __name__ == "__main__":
    main()
