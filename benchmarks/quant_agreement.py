"""Greedy-decoding agreement and weight memory of a trained checkpoint loaded quantized (int8, int4) vs as stored.

    python benchmarks/quant_agreement.py runs/demo/export/hf [--prompts 32] [--new-tokens 32] [--group-size 32]

The checkpoint is any directory ``from_pretrained`` reads (the demo pipeline's ``export/hf`` or a stage's
``final/``); prompts are the first ``--prompt-tokens`` tokens of synthetic text paragraphs (the demo's text
grammars) encoded with the checkpoint's tokenizer. For each mode it prints the fraction of generated tokens
equal to the full-precision model's at the same position, the fraction of prompts whose whole continuation is
identical, and the bytes of the decoder projections and of everything else.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import apriel_jax  # noqa: E402
from apriel_jax.data.synthetic.text import SyntheticText  # noqa: E402
from apriel_jax.data.tokenizer import load_tokenizer  # noqa: E402
from apriel_jax.model.generate import SamplingConfig, generate  # noqa: E402
from apriel_jax.model.quant import weight_bytes  # noqa: E402


def prompt_batch(tokenizer, count: int, length: int, seed: int) -> dict:
    """``count`` prompts of exactly ``length`` tokens (BOS + the start of a synthetic paragraph)."""
    rows, i = [], 0
    text = SyntheticText(seed=seed)
    while len(rows) < count:
        ids = [tokenizer.bos_id, *tokenizer.encode(text[i]["text"])]
        i += 1
        if len(ids) >= length:
            rows.append(ids[:length])
    tokens = np.asarray(rows, np.int32)
    return dict(tokens=tokens, positions=np.tile(np.arange(length, dtype=np.int32), (count, 1)),
                segment_ids=np.ones_like(tokens))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=32, help="int4 group (must divide the widths)")
    parser.add_argument("--seed", type=int, default=123, help="text seed (the demo trains on seed 0's paragraphs)")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.checkpoint)
    batch = prompt_batch(tokenizer, args.prompts, args.prompt_tokens, args.seed)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    rows = []
    reference = None
    for mode in ("none", "int8", "int4"):
        start = time.perf_counter()
        model = apriel_jax.from_pretrained(args.checkpoint, quant=None if mode == "none" else mode,
                                           group_size=args.group_size)
        load_s = time.perf_counter() - start
        tokens = np.asarray(generate(model, batch, sampling)[0])
        reference = tokens if reference is None else reference
        sizes = weight_bytes(nnx.state(model))
        projections = sizes["quantized"] if mode != "none" else _projection_bytes(model)
        rows.append((mode, float(np.mean(tokens == reference)), float(np.mean(np.all(tokens == reference, axis=1))),
                     projections, sizes["other"] - (0 if mode != "none" else projections), load_s))
        if mode == "none":
            print(f"example: {tokenizer.decode(batch['tokens'][0])!r} -> {tokenizer.decode(tokens[0])!r}")
    print(f"{args.checkpoint}: {args.prompts} prompts x {args.new_tokens} greedy tokens, param dtype "
          f"{model.config.param_dtype}")
    print(f"{'mode':6} {'token agreement':>16} {'identical rows':>15} {'projections MB':>15} {'other MB':>9} {'load s':>7}")
    for mode, tokens, rows_same, proj, other, load_s in rows:
        print(f"{mode:6} {tokens:16.3f} {rows_same:15.3f} {proj / 1e6:15.3f} {other / 1e6:9.3f} {load_s:7.1f}")
    return 0


def _projection_bytes(model) -> int:
    """Bytes of the decoder's seven projection kernels of an unquantized model."""
    total = 0
    for sub in (model.decoder.layers.attn, model.decoder.layers.mlp):
        for _, module in nnx.iter_modules(sub):
            kernel = getattr(module, "kernel", None)
            if kernel is not None:
                total += kernel[...].nbytes
    return total


if __name__ == "__main__":
    sys.exit(main())
