"""Compile the 15B LoRA training step on a quantized base for one TPU chip, ahead of time, on this CPU host.

    python benchmarks/quant_aot.py --mode int4 --topology v5e:1x1 [--embeddings] [--seq 4096] [--rank 16] [--hlo out.txt]

Prints the compiled step's per-chip memory (arguments, temporaries, peak; GB) and what the optimized HLO
says about the quantized matmuls: every bf16 array the size of a whole projection weight (one layer's
[5120, 14336], [5120, 32, 128], their int4 grouped shapes such as [40, 128, 14336], or a stacked
[48, ...]) or of a whole vocabulary table (with ``--embeddings``) that an instruction produces, i.e. a
dequantized copy of a weight (or a weight-sized broadcast of its scales) that XLA did not fuse into the
dot's operand.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apriel_jax.model.lora import lora_config, with_lora  # noqa: E402
from apriel_jax.model.presets import get_preset  # noqa: E402
from apriel_jax.model.quant import with_quant  # noqa: E402
from apriel_jax.train.aot import compile_train_step  # noqa: E402
from apriel_jax.train.optimizer import make_optimizer, trainable_for_step  # noqa: E402


def model_config(mode: str, rank: int, group_size: int, layers: int | None = None, embeddings: bool = False):
    """The Colab-tier model: the 15B preset in bf16, rank-``rank`` adapters on the seven decoder projections,
    the projections quantized (``mode``; the embedding and LM head too with ``embeddings``), full remat,
    attention on the TPU kernel (``auto``: XLA's attention would hold a layer's [heads, S, S] scores)."""
    cfg = get_preset("apriel_15b")
    if layers:
        cfg.decoder.num_layers = layers
    cfg.dtype, cfg.param_dtype, cfg.remat_policy, cfg.attention_impl = "bfloat16", "bfloat16", "full", "auto"
    return with_lora(with_quant(cfg, mode, group_size, embeddings), lora_config(rank=rank, alpha=2.0 * rank))


def weight_shapes(cfg) -> set[tuple[int, ...]]:
    """Shapes of one layer's projection kernels in their own layouts and int4 grouped ones, of the stacked
    ones, and of the vocabulary tables. (Their 2-D flattenings are left out: [4096, 5120] is also a
    4096-token activation.)"""
    d = cfg.decoder
    e, i, h, kv, hd, n = d.hidden_size, d.intermediate_size, d.num_heads, d.num_kv_heads, d.head_dim, d.num_layers
    gs = cfg.quant.group_size
    layer = {(e, i), (i, e), (e, h, hd), (h, hd, e), (e, kv, hd),
             (e // gs, gs, i), (i // gs, gs, e), (e // gs, gs, h, hd), (e // gs, gs, kv, hd), (h, hd // gs, gs, e)}
    return layer | {(n, *s) for s in layer} | {(d.vocab_size, e), (e, d.vocab_size)}


def _unfused_lines(hlo: str):
    """The instructions of the optimized HLO that own a buffer: those outside the computations that fusions
    call (a nested fusion inside a convolution fusion computes its operand on the fly)."""
    fused = set(re.findall(r"calls=%([\w.\-]+)", hlo))
    current = None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header and " = " not in line:
            current = header.group(1)
            continue
        if current not in fused:
            yield line


def whole_weight_buffers(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """Buffers of bf16/f32 arrays shaped like a whole weight (one layer's or stacked)."""
    found = []
    for line in _unfused_lines(hlo):
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (bf16|f32)\[([\d,]*)\]", line)
        if not m or " parameter(" in line:
            continue
        shape = tuple(int(x) for x in m.group(3).split(",") if x)
        if shape in shapes:
            found.append(line.strip()[:240])
    return found


def int_operand_fusions(hlo: str) -> list[str]:
    """Convolution (dot) fusions that take an int4/int8 operand: the dequantization runs inside them."""
    out = []
    for line in _unfused_lines(hlo):
        if "kind=kOutput" in line and re.search(r"\bs(4|8)\[", line + "".join(_operand_types(hlo, line))):
            out.append(line.strip()[:240])
    return out


def _operand_types(hlo: str, line: str) -> list[str]:
    m = re.search(r"calls=%([\w.\-]+)", line)
    if not m:
        return []
    header = re.search(rf"^%{re.escape(m.group(1))} \((.*)\) -> ", hlo, re.M)
    return [header.group(1)] if header else []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="int4", choices=("int8", "int4"))
    parser.add_argument("--topology", default="v5e:1x1")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--embeddings", action="store_true", help="the embedding and LM head in int8 too")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's 48)")
    parser.add_argument("--hlo", default="", help="write the optimized HLO here")
    args = parser.parse_args(argv)

    cfg = model_config(args.mode, args.rank, args.group_size, args.layers or None, args.embeddings)
    trainable = trainable_for_step(("all",), 0, adapters=True)  # text-only LoRA: the decoder's adapters
    result, _ = compile_train_step(cfg, make_optimizer(1e-4), args.topology, {"fsdp": -1}, batch=args.batch,
                                   seq=args.seq, patches=0, trainable=trainable, chunk_size=1024)
    gb = 1e9
    print(f"{args.mode}{' + int8 embeddings' * args.embeddings} {args.topology} seq {args.seq} batch {args.batch} rank {args.rank}: "
          f"arguments {result.argument_bytes / gb:.2f} GB, temp {result.temp_bytes / gb:.2f} GB, "
          f"output {result.output_bytes / gb:.2f} GB, alias {result.alias_bytes / gb:.2f} GB, "
          f"peak {result.peak_bytes / gb:.2f} GB, fits: {result.fits()}, compile {result.compile_seconds:.0f} s")
    if not result.hlo_text:
        print(f"HLO unreadable: {result.hlo_error}")
        return 1
    if args.hlo:
        Path(args.hlo).write_text(result.hlo_text)
    buffers = whole_weight_buffers(result.hlo_text, weight_shapes(cfg))
    print(f"whole-weight bf16/f32 arrays produced: {len(buffers)}")
    for line in buffers[:20]:
        print("  ", line)
    fused = int_operand_fusions(result.hlo_text)
    print(f"convolution fusions reading an int4/int8 operand: {len(fused)}")
    for line in fused[:12]:
        print("  ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
