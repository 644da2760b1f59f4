"""``apriel-jax convert``: checkpoints between HF safetensors, apriel-jax orbax, Mistral consolidated and PEFT
adapter directories (``apriel_jax.checkpoint.pretrained`` does the work)."""

from __future__ import annotations

import argparse
import re
import time

_CONVERT_EPILOG = """\
checkpoint formats:
  hf       config.json + model*.safetensors (LlavaForConditionalGeneration)
  orbax    apriel_config.json + params/ (apriel-jax's own)
  mistral  params.json + consolidated.safetensors (e.g. Pixtral-12B-2409)
  peft     adapter_config.json + adapter_model.safetensors (LoRA adapters, PeftModel.from_pretrained)
Tokenizer, chat template and processor files next to the weights are carried along. A checkpoint
with LoRA adapters (a LoRA run's) is written to HF merged; orbax-to-peft writes the adapters alone.
"""


def size_in_bytes(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1000' -> 1000 (decimal units as in transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "b").lower()
    scale = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least one byte")
    return size


def dtype_name(text: str) -> str:
    allowed = ("float32", "bfloat16", "float16")
    if text not in allowed:
        raise argparse.ArgumentTypeError(f"unsupported dtype {text!r}; choose one of {', '.join(allowed)}")
    return text


def add_parser(commands, debug, fmt) -> None:
    convert = commands.add_parser(
        "convert", formatter_class=fmt, epilog=_CONVERT_EPILOG,
        help="convert checkpoints between HF, orbax and Mistral formats (and LoRA adapters to PEFT)",
        description="Convert a checkpoint directory SRC into a new directory DST.",
    )
    kinds = convert.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)

    def conversion(name, help_text):
        sub = kinds.add_parser(name, parents=[debug], formatter_class=fmt, epilog=_CONVERT_EPILOG,
                               help=help_text, description=help_text)
        sub.add_argument("src", metavar="SRC", help="source checkpoint directory")
        sub.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
        sub.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        sub.set_defaults(handler=_run_convert)
        return sub

    def shard_option(sub):
        sub.add_argument("--max-shard-size", type=size_in_bytes, default=size_in_bytes("5GB"), metavar="SIZE",
                         help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default: 5GB)")

    sub = conversion("hf-to-orbax", "HF safetensors (or Mistral) -> apriel-jax orbax checkpoint")
    sub.add_argument("--param-dtype", type=dtype_name, metavar="DTYPE",
                     help="dtype to store parameters in (default: the checkpoint's)")
    sub = conversion("orbax-to-hf", "apriel-jax orbax checkpoint -> HF LlavaForConditionalGeneration")
    sub.add_argument("--dtype", type=dtype_name, metavar="DTYPE", help="dtype of the written tensors "
                     "(default: the parameters')")
    shard_option(sub)
    sub = conversion("orbax-to-peft", "the LoRA adapters of an apriel-jax orbax checkpoint -> PEFT adapter "
                     "directory (orbax-to-hf writes the model with them merged)")
    sub.add_argument("--dtype", type=dtype_name, metavar="DTYPE", help="dtype of the written tensors "
                     "(default: the parameters')")
    sub.add_argument("--base", default="", metavar="PATH_OR_NAME",
                     help="the HF base model the adapters apply to (adapter_config.json base_model_name_or_path)")
    sub = conversion("mistral-to-hf", "Mistral consolidated (params.json) -> HF LlavaForConditionalGeneration")
    sub.add_argument("--dtype", type=dtype_name, metavar="DTYPE", help="dtype of the written tensors "
                     "(default: the checkpoint's)")
    shard_option(sub)
    sub = conversion("hf-to-mistral", "HF LlavaForConditionalGeneration -> Mistral consolidated (params.json)")
    sub.add_argument("--dtype", type=dtype_name, metavar="DTYPE", help="dtype of the written tensors "
                     "(default: the checkpoint's)")



def _dir_summary(path) -> str:
    from apriel_jax import storage

    # Walked level by level with iterdir: epath refuses recursive globs on gs://.
    files, pending = [], [storage.location(path)]
    with storage.storage_errors(pending[0], "list"):
        while pending:
            for entry in pending.pop().iterdir():
                (pending if entry.is_dir() else files).append(entry)
        size = sum(f.stat().length for f in files)
    return f"{len(files)} files, {size / 1e6:.1f} MB"


def _run_convert(args, overrides: list[str]) -> int:
    from apriel_jax import storage
    from apriel_jax.checkpoint import pretrained

    start = time.perf_counter()
    kind = args.conversion
    # Credentials, buckets and write access of gs:// locations, before any loading work.
    storage.preflight(read=[args.src], write=[args.dst])
    dst = storage.location(args.dst)
    with storage.storage_errors(dst, "list"):
        occupied = dst.is_dir() and any(True for _ in dst.iterdir())
    if occupied and not args.overwrite:
        # Checked here as well so the message names the CLI flag, and before any loading work.
        raise FileExistsError(f"{args.dst} exists and is not empty (pass --overwrite to replace it)")
    if kind == "hf-to-orbax":
        out = pretrained.hf_to_orbax(args.src, args.dst, param_dtype=args.param_dtype, overwrite=args.overwrite)
    elif kind == "orbax-to-hf":
        out = pretrained.orbax_to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                     max_shard_bytes=args.max_shard_size)
    elif kind == "orbax-to-peft":
        out = pretrained.orbax_to_peft(args.src, args.dst, base_model_name_or_path=args.base, dtype=args.dtype,
                                       overwrite=args.overwrite)
    elif kind == "mistral-to-hf":
        out = pretrained.mistral_to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                       max_shard_bytes=args.max_shard_size)
    else:
        out = pretrained.hf_to_mistral(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"{kind}: wrote {out} ({_dir_summary(out)}) in {time.perf_counter() - start:.1f}s")
    return 0
