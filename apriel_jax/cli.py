"""The ``apriel-jax`` command line: ``demo`` and ``data`` here; ``convert`` (cli_convert), ``generate``
(cli_generate), ``train`` and ``plot`` (cli_train), ``pipeline`` (cli_pipeline) and ``aot`` (cli_aot) in
their own modules.

Heavy imports (jax, flax, transformers) happen inside the subcommand handlers, so ``--help`` is fast
and a typo in the arguments is reported before anything is loaded.

Exit codes: 0 success; 2 usage errors and bad inputs (unreadable or mismatched checkpoints, missing
files, existing outputs, bad config overrides), reported as one line on stderr (``--debug`` shows the
traceback); anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import os
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


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="apriel-jax", formatter_class=fmt,
        description="Apriel-1.5 / Pixtral in JAX: demo run, checkpoint conversion, generation, data tools, training,\n"
                    "the staged recipe (pipeline) and TPU fit checks compiled ahead of time (aot).",
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

    from apriel_jax.cli_convert import add_parser as _add_convert_parser

    _add_convert_parser(commands, debug, fmt)
    from apriel_jax.cli_generate import add_parser as _add_generate_parser

    _add_generate_parser(commands, debug, fmt)
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
