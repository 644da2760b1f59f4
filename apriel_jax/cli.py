"""The ``apriel-jax`` command line: ``demo``, ``convert``, ``generate``, ``data``.

Heavy imports (jax, flax, transformers) happen inside the subcommand handlers, so ``--help`` is fast
and a typo in the arguments is reported before anything is loaded.

Exit codes: 0 success; 2 usage errors and bad inputs (unreadable or mismatched checkpoints, missing
files, existing outputs, bad config overrides), reported as one line on stderr (``--debug`` shows the
traceback); anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

from apriel_jax.utils.platform import quiet_libtpu_without_tpu

EXIT_USAGE = 2


class UsageError(ValueError):
    """An argument value the command cannot use (reported like an argparse error, exit code 2)."""

_DEMO_EPILOG = """\
config:
  Without --config the embedded default (apriel_jax.demo.default_config, the same as
  configs/quickstart.py) is used. Any field can be overridden, with the value parsed as the field's
  type, e.g.
    apriel-jax demo --config.out_dir=/tmp/qs --config.seed=3 --config.max_new_tokens=8
    apriel-jax demo --config.image_sizes="[(64, 32)]" --config.mesh.fsdp=2 --config.check_transformers=false
  Fields: model (the whole model config: --config.model.decoder.num_layers=4), seed, out_dir, image_sizes, prompt, max_new_tokens, mesh.{data,fsdp,tensor,sequence},
  check_transformers, transformers_rtol, matmul_precision.

Every step checks its result; a failed check stops the run with an error (exit code 1).
"""

_CONVERT_EPILOG = """\
checkpoint formats:
  hf       config.json + model*.safetensors (LlavaForConditionalGeneration)
  orbax    apriel_config.json + params/ (apriel-jax's own)
  mistral  params.json + consolidated.safetensors (e.g. Pixtral-12B-2409)
  peft     adapter_config.json + adapter_model.safetensors (LoRA adapters, PeftModel.from_pretrained)
Tokenizer, chat template and processor files next to the weights are carried along. A checkpoint
with LoRA adapters (a LoRA run's) is written to HF merged; orbax-to-peft writes the adapters alone.
"""

_DATA_EPILOG = """\
sources:
  JSONL files of {"text": ...} or {"messages": [...], "tools"?: [...]} records (image parts as
  {"type": "image", "path": REL} relative to the file, or inline "image_base64"), a directory
  written by `apriel-jax data prepare` (ArrayRecord shards + manifest.json, written last), or
  (inspect) Parquet files. Every path may be local or gs://bucket/...; quote globs so that the
  command expands them (gs:// globs cannot be expanded by the shell).
  Also read, and converted exactly: LLaVA/ShareGPT records ({"conversations": [{"from": "human"|"gpt",
  "value": ...}], "image"|"images": ...} with <image> placeholders), OpenAI-style messages with
  {"type": "image_url", "image_url": {"url": PATH | file://... | data:image/...;base64,...}} parts
  (http(s) URLs are refused: nothing is fetched at training time), and "messages" with <image>
  placeholders plus an "images" list.
bad records:
  A malformed record (bad JSON, wrong types or fields, an empty conversation, an unreadable or
  undecodable image, <image> placeholders that do not match the images, ...) is skipped with a
  warning naming FILE:LINE and the reason, and counted per reason; --strict stops at the first
  instead, with that one line (exit code 2).
examples:
  apriel-jax data prepare apriel_jax/data/demo_data/*.jsonl --out /tmp/demo_ar
  apriel-jax data inspect /tmp/demo_ar --seq-len 1024 --rows 2
  apriel-jax data prepare 'gs://bucket/raw/*.jsonl' --out gs://bucket/data/sft
  apriel-jax data inspect gs://bucket/data/sft --rows 2
"""

_INSPECT_EPILOG = _DATA_EPILOG + """\
output:
  Each packed row is printed document by document ("|" starts a document, with its source).
  Text is decoded with special tokens shown; loss targets are wrapped in «...»; an image block
  is shown as <image ROWSxCOLS> (its patch grid). Then packing efficiency (real tokens and patches
  over the rows' capacity) and the converter's counters.
"""

_GENERATE_EPILOG = """\
The prompt is <s>, then each --image in order (Pixtral's [IMG]/[IMG_BREAK]/[IMG_END] layout), then
the --prompt text; instruction-tuned checkpoints see raw text unless --chat renders a user turn.
Generation stops at </s> or after --max-new-tokens tokens.
"""


def _size_in_bytes(text: str) -> int:
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


def _dtype_name(text: str) -> str:
    allowed = ("float32", "bfloat16", "float16")
    if text not in allowed:
        raise argparse.ArgumentTypeError(f"unsupported dtype {text!r}; choose one of {', '.join(allowed)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="apriel-jax", formatter_class=fmt,
        description="Apriel-1.5 / Pixtral in JAX: demo run, checkpoint conversion, generation, data tools.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    # Subcommands accept --debug too; SUPPRESS keeps their unset default from hiding the top-level one.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", parents=[debug], formatter_class=fmt, epilog=_DEMO_EPILOG,
        help="tiny end-to-end run: tokenizer, sharded model, export/import, parity, generation",
        description="Train a tiny tokenizer, create the tiny model sharded over all devices, run a prompt\n"
                    "with two images, export to HF format and back, compare with transformers, generate.",
    )
    demo.add_argument("--config", metavar="PATH",
                      help="config file defining get_config() (PATH or PATH:ARG); default: embedded quickstart")
    demo.set_defaults(handler=_run_demo)

    convert = commands.add_parser(
        "convert", formatter_class=fmt, epilog=_CONVERT_EPILOG,
        help="convert checkpoints between HF, orbax and Mistral formats",
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
        sub.add_argument("--max-shard-size", type=_size_in_bytes, default=_size_in_bytes("5GB"), metavar="SIZE",
                         help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default: 5GB)")

    sub = conversion("hf-to-orbax", "HF safetensors (or Mistral) -> apriel-jax orbax checkpoint")
    sub.add_argument("--param-dtype", type=_dtype_name, metavar="DTYPE",
                     help="dtype to store parameters in (default: the checkpoint's)")
    sub = conversion("orbax-to-hf", "apriel-jax orbax checkpoint -> HF LlavaForConditionalGeneration")
    sub.add_argument("--dtype", type=_dtype_name, metavar="DTYPE", help="dtype of the written tensors "
                     "(default: the parameters')")
    shard_option(sub)
    sub = conversion("orbax-to-peft", "the LoRA adapters of an apriel-jax orbax checkpoint -> PEFT adapter "
                     "directory (orbax-to-hf writes the model with them merged)")
    sub.add_argument("--dtype", type=_dtype_name, metavar="DTYPE", help="dtype of the written tensors "
                     "(default: the parameters')")
    sub.add_argument("--base", default="", metavar="PATH_OR_NAME",
                     help="the HF base model the adapters apply to (adapter_config.json base_model_name_or_path)")
    sub = conversion("mistral-to-hf", "Mistral consolidated (params.json) -> HF LlavaForConditionalGeneration")
    sub.add_argument("--dtype", type=_dtype_name, metavar="DTYPE", help="dtype of the written tensors "
                     "(default: the checkpoint's)")
    shard_option(sub)
    sub = conversion("hf-to-mistral", "HF LlavaForConditionalGeneration -> Mistral consolidated (params.json)")
    sub.add_argument("--dtype", type=_dtype_name, metavar="DTYPE", help="dtype of the written tensors "
                     "(default: the checkpoint's)")

    gen = commands.add_parser(
        "generate", parents=[debug], formatter_class=fmt, epilog=_GENERATE_EPILOG,
        help="generate text from a checkpoint, a prompt and optional images",
        description="Load a checkpoint (HF, Mistral or orbax directory) and its tokenizer (tokenizer.json\n"
                    "or tekken.json in the same directory) and continue a prompt.",
    )
    gen.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image file to put before the text (repeat for several, kept in order)")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="prompt text, after the images")
    gen.add_argument("--chat", choices=("apriel", "think", "nothink"), metavar="MODE",
                     help="render the prompt as a user turn in this chat format (apriel | think | nothink) "
                          "and print the reasoning and the final answer separately; apriel uses the "
                          "checkpoint's chat template when it has one")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: 64")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass, 1 = off (default)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K",
                     help="keep the k most likely tokens, 0 = off (default)")
    gen.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    gen.add_argument("--longest-edge", type=int, default=1024, metavar="PIXELS",
                     help="resize images so their longest side is at most this (default: 1024; capped at "
                          "the model's vision image_size)")
    gen.add_argument("--dtype", type=_dtype_name, metavar="DTYPE",
                     help="compute and parameter dtype (default: the checkpoint's)")
    gen.set_defaults(handler=_run_generate)
    _add_data_parser(commands, debug, fmt)
    from apriel_jax.cli_train import add_parsers as _add_train_parsers  # train, plot (light imports)

    _add_train_parsers(commands, debug, fmt)
    from apriel_jax.cli_pipeline import add_parser as _add_pipeline_parser

    _add_pipeline_parser(commands, debug, fmt)
    from apriel_jax.cli_aot import add_parser as _add_aot_parser

    _add_aot_parser(commands, debug, fmt)
    return parser


def _add_data_parser(commands, debug, fmt) -> None:
    from apriel_jax.data.chat import MODES  # light: no jax

    data = commands.add_parser(
        "data", formatter_class=fmt, epilog=_DATA_EPILOG,
        help="prepare ArrayRecord shards from JSONL, inspect packed training rows",
        description="Training data tools: convert JSONL (+ images) to ArrayRecord, look at packed rows.",
    )
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)

    prepare = actions.add_parser(
        "prepare", parents=[debug], formatter_class=fmt, epilog=_DATA_EPILOG,
        help="JSONL files (+ the images they reference) -> self-contained ArrayRecord shards",
        description="Convert JSONL files into ArrayRecord shards with images embedded as base64,\n"
                    "plus manifest.json listing the shards and their record counts. Every record is\n"
                    "checked as training would check it, and every image read and decoded, before\n"
                    "anything is written; an existing output is replaced only with --overwrite, and\n"
                    "only by a complete new one.")
    prepare.add_argument("jsonl", nargs="+", metavar="JSONL",
                         help="input JSONL files or globs (local or gs://), read in order")
    prepare.add_argument("--out", required=True, metavar="DIR",
                         help="output directory, local or gs:// (must not exist or be empty, unless --overwrite)")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace an existing output directory whole")
    prepare.add_argument("--records-per-shard", type=int, default=10_000, metavar="N",
                         help="records per shard (default: 10000)")
    prepare.add_argument("--strict", action="store_true",
                         help="stop at the first bad record (default: skip bad records, counted per reason)")
    prepare.set_defaults(handler=_run_data_prepare)

    inspect = actions.add_parser(
        "inspect", parents=[debug], formatter_class=fmt, epilog=_INSPECT_EPILOG,
        help="tokenize, pack and print a few training rows from JSONL files or an ArrayRecord directory",
        description="Read records, turn them into documents as training would (RecordToDocument), pack\n"
                    "the first few rows and print them decoded, with packing efficiency and counters.")
    inspect.add_argument("sources", nargs="+", metavar="SOURCE",
                         help="JSONL or Parquet file (or a glob of them), or `data prepare` output directory; "
                              "local or gs://; records are taken from the sources in turn")
    inspect.add_argument("--tokenizer", default="pixtral", metavar="PATH",
                         help="tokenizer file or directory, or 'pixtral' for the Tekken tokenizer shipped "
                              "with mistral-common (default)")
    inspect.add_argument("--seq-len", type=int, default=512, metavar="S", help="tokens per row (default: 512)")
    inspect.add_argument("--patch-budget", type=int, default=256, metavar="P",
                         help="image patches per row; larger images are downscaled to fit (default: 256)")
    inspect.add_argument("--longest-edge", type=int, default=1024, metavar="PIXELS",
                         help="resize images so their longest side is at most this (default: 1024)")
    inspect.add_argument("--rows", type=int, default=3, metavar="N", help="rows to print (default: 3)")
    inspect.add_argument("--format", default="apriel", choices=MODES, help="chat format (default: apriel)")
    inspect.add_argument("--loss", default="responses", choices=("responses", "all"),
                         help="chat loss: assistant turns only, or every token (default: responses)")
    inspect.add_argument("--strict", action="store_true",
                         help="stop at the first bad record (default: skip bad records, counted per reason)")
    inspect.set_defaults(handler=_run_data_inspect)


# --------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------


def _run_demo(args, overrides: list[str]) -> int:
    from apriel_jax.demo import default_config, run_demo
    from apriel_jax.utils.config_cli import apply_overrides, load_config_file

    cfg = load_config_file(args.config) if args.config else default_config()
    apply_overrides(cfg, overrides)
    run_demo(cfg)
    return 0


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


def _run_generate(args, overrides: list[str]) -> int:
    import jax
    import numpy as np

    from apriel_jax.chat import check_tokenizer_fits
    from apriel_jax.checkpoint.pretrained import detect_format, from_pretrained
    from apriel_jax.data.images import ImageConfig, load_image
    from apriel_jax.data.prompt import encode_prompt, prompt_batch
    from apriel_jax.data.tokenizer import load_tokenizer
    from apriel_jax.model.generate import SamplingConfig, generate

    # Cheap checks first: bad settings, a missing tokenizer or image should not cost a model load.
    detect_format(args.checkpoint)  # raises for a missing directory or one that holds no checkpoint
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tokenizer = load_tokenizer(args.checkpoint)
    images = [load_image(path) for path in args.image]
    if args.chat:
        return _chat_generate(args, sampling, tokenizer, images)

    start = time.perf_counter()
    model = from_pretrained(args.checkpoint, dtype=args.dtype, param_dtype=args.dtype)
    cfg = model.config
    image_cfg = ImageConfig(longest_edge=min(args.longest_edge, cfg.vision.image_size),
                            patch_size=cfg.vision.patch_size)
    ids, encoded = encode_prompt([*images, args.prompt], tokenizer, image_cfg)
    check_tokenizer_fits(cfg, tokenizer, ids)
    batch = prompt_batch([(ids, encoded)], pad_id=tokenizer.pad_id, image_id=tokenizer.image_id)
    loaded = time.perf_counter() - start

    sampling = dataclasses.replace(sampling, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
    start = time.perf_counter()
    new, _ = generate(model, batch, sampling, rng=jax.random.key(args.seed))
    new = np.asarray(new)[0].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    text = tokenizer.decode(new)
    print(text)
    print(f"[{len(ids)} prompt tokens ({len(images)} image(s)), {len(new)} new tokens; load {loaded:.1f}s, "
          f"generate {time.perf_counter() - start:.1f}s]", file=sys.stderr)
    return 0


def _chat_generate(args, sampling, tokenizer, images) -> int:
    from apriel_jax.chat import chat
    from apriel_jax.checkpoint.pretrained import from_pretrained
    from apriel_jax.data.chat_template import ChatTemplate

    template = ChatTemplate.from_checkpoint(args.checkpoint)  # None: the built-in Apriel renderer
    model = from_pretrained(args.checkpoint, dtype=args.dtype, param_dtype=args.dtype)
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": args.prompt}]
    start = time.perf_counter()
    try:
        reply = chat(model, tokenizer, [{"role": "user", "content": content}], mode=args.chat, sampling=sampling,
                     seed=args.seed, longest_edge=args.longest_edge, template=template)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if reply.reasoning:
        print(f"reasoning: {reply.reasoning}")
    print(f"answer: {reply.answer}")
    for call in reply.tool_calls:
        print(f"tool call: {call}")
    print(f"[{len(reply.tokens)} new tokens; generate {time.perf_counter() - start:.1f}s]", file=sys.stderr)
    return 0


def _run_data_prepare(args, overrides: list[str]) -> int:
    import os

    from apriel_jax import storage
    from apriel_jax.data.sources import prepare_array_record
    from apriel_jax.data.validate import describe_skips

    if args.records_per_shard < 1:
        raise UsageError(f"--records-per-shard must be >= 1, got {args.records_per_shard}")
    start = time.perf_counter()
    manifest = prepare_array_record(args.jsonl, args.out, records_per_shard=args.records_per_shard,
                                    on_invalid="error" if args.strict else "skip", overwrite=args.overwrite)
    out = os.fspath(storage.location(args.out))
    for shard in manifest["shards"]:
        print(f"  {out}/{shard['path']}: {shard['records']} records")
    skipped = (f", {manifest['skipped']} bad records skipped ({describe_skips(manifest['skipped_reasons'])}; listed "
               f"in {out}/manifest.json)" if manifest["skipped"] else "")
    print(f"data prepare: {manifest['records']} records in {len(manifest['shards'])} shard(s){skipped} -> "
          f"{args.out} ({time.perf_counter() - start:.1f}s)")
    if manifest["without_assistant_turn"]:
        print(f"note: {manifest['without_assistant_turn']} chats have no assistant turn; training with "
              "data.loss='responses' skips them (no_assistant_turn)")
    return 0


def _inspect_source(path: str):
    """(name, source) for one SOURCE argument of `data inspect`, chosen by what the files are."""
    import posixpath

    from apriel_jax.data.sources import ArrayRecordSource, JsonlSource, expand_data_paths

    files = expand_data_paths(path, what="data inspect")
    base = posixpath.basename(path.rstrip("/"))
    name = posixpath.splitext(base)[0] if len(files) == 1 and files[0].endswith(base) else base
    if all(f.endswith(".array_record") for f in files):
        return name, ArrayRecordSource(files)
    if all(f.endswith(".parquet") for f in files):
        from apriel_jax.data.parquet import ParquetSource

        return name, ParquetSource(files)
    # Records are parsed as they are shown: a few rows of a large file need not parse all of it.
    return name, JsonlSource(files, on_error="defer")


def _run_data_inspect(args, overrides: list[str]) -> int:
    from apriel_jax.data.images import ImageConfig
    from apriel_jax.data.packing import Packer, PackingConfig
    from apriel_jax.data.records import RecordToDocument
    from apriel_jax.data.validate import convert_or_skip, describe_skips

    for flag, value, least in (("--seq-len", args.seq_len, 2), ("--patch-budget", args.patch_budget, 1),
                               ("--rows", args.rows, 1), ("--longest-edge", args.longest_edge, 1)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    sources = [_inspect_source(p) for p in args.sources]
    image_cfg = ImageConfig(longest_edge=args.longest_edge)
    on_invalid = "error" if args.strict else "skip"
    convert = RecordToDocument(args.tokenizer, mode=args.format, loss=args.loss, image_cfg=image_cfg,
                               patch_budget=args.patch_budget, on_invalid=on_invalid)
    tok = convert.tokenizer  # load now: a bad path fails before any record is read
    cfg = PackingConfig(seq_len=args.seq_len, patch_budget=args.patch_budget,
                        patch_dim=image_cfg.patch_size ** 2 * 3, pad_id=tok.pad_id, image_too_large="skip",
                        image_token_id=tok.image_id, image_break_id=tok.image_break_id,
                        image_end_id=tok.image_end_id)
    packer, rows = Packer(cfg), []
    for name, src, i in _round_robin(sources):
        # A record the source cannot read (bad JSON) is skipped or stops, as the converter's own are.
        doc = convert_or_skip(lambda: convert(src[i]), on_invalid, convert.skips)
        doc.source = name
        rows += packer.add(doc)
        if len(rows) >= args.rows:
            break
    else:
        rows += packer.flush()
    for i, row in enumerate(rows[:args.rows]):
        print(f"=== row {i}: {row.num_tokens}/{cfg.seq_len} tokens, {row.num_patches}/{cfg.patch_budget} "
              f"patches, {len(row.pieces)} documents")
        for piece in row.pieces:
            print(f"| [{piece.source}, {len(piece)} tokens, {piece.num_patches} patches] "
                  + _render_document(piece, tok, cfg).replace("\n", "\n    "))
    st = packer.stats
    print(f"packing efficiency over {st.rows} rows: tokens {st.token_efficiency:.1%} ({st.tokens}/"
          f"{st.tokens + st.padding_tokens}), patches {st.patch_efficiency:.1%} ({st.patches}/"
          f"{st.patches + st.padding_patches})")
    skips = convert.skips
    print(f"records: {st.documents} read, {skips.total} skipped ({describe_skips(skips.counts)}); "
          f"{convert.downscaled_images} images downscaled to fit; packer: {st.split} documents split, "
          f"{st.dropped - skips.total} dropped, {st.skipped_images} images too large for a row")
    return 0


def _round_robin(sources):
    """(name, source, index) taking one record from each source in turn until all are exhausted."""
    longest = max(len(src) for _, src in sources)
    for i in range(longest):
        for name, src in sources:
            if i < len(src):
                yield name, src, i


def _render_document(doc, tok, cfg) -> str:
    """Decoded text of a document: loss targets in «», images as <image ROWSxCOLS>."""
    from apriel_jax.data.packing import image_blocks

    blocks = image_blocks(doc, cfg)
    out, i, k = [], 0, 0
    while i < len(doc):
        if k < len(blocks) and i == blocks[k][0]:
            rows, cols = (doc.images[k].positions.max(axis=0) + 1).tolist()
            out.append(f"<image {rows}x{cols}>")
            i, k = blocks[k][1], k + 1
            continue
        # A run of text tokens with the same loss role, up to the next image block.
        stop = blocks[k][0] if k < len(blocks) else len(doc)
        target = doc.loss_mask[i] > 0
        j = i + 1
        while j < stop and (doc.loss_mask[j] > 0) == target:
            j += 1
        text = tok.decode(doc.tokens[i:j].tolist(), skip_special_tokens=False)
        out.append(f"«{text}»" if target else text)
        i = j
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's inputs rather than by a bug: one line, exit code 2."""
    from apriel_jax.checkpoint.hf_config import ConfigError
    from apriel_jax.checkpoint.safetensors_io import CheckpointError
    from apriel_jax.data.images import ImageError
    from apriel_jax.data.sources import DataError
    from apriel_jax.data.tokenizer import UnknownSpecialTokenError
    from apriel_jax.parallel.distributed import HostsDisagree, PeerFailed
    from apriel_jax.storage import StorageError
    from apriel_jax.utils.config_cli import ConfigOverrideError, UnknownConfigKeyError

    return (UsageError, CheckpointError, ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError,
            ImageError, ConfigOverrideError, UnknownConfigKeyError, UnknownSpecialTokenError, DataError,
            StorageError, HostsDisagree, PeerFailed)


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _mark_absl_flags_parsed() -> None:
    # grain reads absl flags and raises UnparsedFlagAccessError unless absl.app parsed the command
    # line; we parse our own, so let absl fall back to its defaults.
    try:
        from absl import flags
    except ImportError:
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _split_demo_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull ``--config.x.y=V`` overrides out of a ``demo`` or ``pipeline`` command line, whose config file
    is optional (only there: a generate prompt that looks like ``config.a=b`` must stay a prompt)."""
    from apriel_jax.utils.config_cli import split_overrides

    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command_at is None or argv[command_at] not in ("demo", "pipeline", "aot"):
        return [], argv
    overrides, rest = split_overrides(argv[command_at + 1:])
    return overrides, argv[: command_at + 1] + rest


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (``--help`` and argparse errors raise SystemExit)."""
    quiet_libtpu_without_tpu()
    _mark_absl_flags_parsed()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        overrides, argv = _split_demo_overrides(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    if args.debug:  # library code keeps every message and traceback it would otherwise summarise
        from apriel_jax.storage.errors import DEBUG_ENV

        os.environ[DEBUG_ENV] = "1"
    try:
        return args.handler(args, overrides)
    except _expected_errors() as e:
        if args.debug:
            raise
        print(f"apriel-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # Run the package module's main, not this __main__ copy: the subcommand modules raise
    # apriel_jax.cli.UsageError, which must be the class main() catches.
    from apriel_jax.cli import main as _package_main

    sys.exit(_package_main())
