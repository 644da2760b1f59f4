"""``apriel-jax generate``: continue a prompt (optionally with images, optionally as a chat turn) from a
checkpoint directory."""

from __future__ import annotations

import dataclasses
import sys
import time

from apriel_jax.cli_convert import dtype_name

_GENERATE_EPILOG = """\
The prompt is <s>, then each --image in order (Pixtral's [IMG]/[IMG_BREAK]/[IMG_END] layout), then
the --prompt text; instruction-tuned checkpoints see raw text unless --chat renders a user turn.
Generation stops at </s> or after --max-new-tokens tokens.
"""


def add_parser(commands, debug, fmt) -> None:
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
    gen.add_argument("--dtype", type=dtype_name, metavar="DTYPE",
                     help="compute and parameter dtype (default: the checkpoint's)")
    gen.add_argument("--adapter", metavar="DIR",
                     help="LoRA adapters to apply: a PEFT adapter directory (adapter_config.json + "
                          "adapter_model.safetensors), e.g. written by `apriel-jax convert orbax-to-peft` or by peft")
    gen.add_argument("--quant", choices=("none", "int8", "int4"), default="none", metavar="MODE",
                     help="store the decoder's seven projections quantized, as they are read: int8 (per output "
                          "channel) or int4 (groups of --group-size along the input); none (default): as stored")
    gen.add_argument("--group-size", type=int, default=128, metavar="N",
                     help="int4 group size along each projection's input (default: 128)")
    gen.add_argument("--quant-embeddings", action="store_true",
                     help="with --quant: also store the token embedding and the LM head in int8 (one scale "
                          "per vocabulary row; 1.3 GB less for the 15B)")
    gen.set_defaults(handler=_run_generate)


def _load_model(args):
    """The checkpoint's model (its projections quantized with --quant, its embedding and LM head with
    --quant-embeddings), with the --adapter's LoRA adapters when one is given."""
    from apriel_jax.checkpoint.pretrained import from_pretrained

    model = from_pretrained(args.checkpoint, dtype=args.dtype, param_dtype=args.dtype,
                            quant=None if args.quant == "none" else args.quant, group_size=args.group_size,
                            quant_embeddings=args.quant_embeddings)
    if args.adapter:
        from apriel_jax.checkpoint.peft_adapters import load_peft

        model = load_peft(args.adapter, model)
    return model


def _run_generate(args, overrides: list[str]) -> int:
    import jax
    import numpy as np

    from apriel_jax.chat import check_tokenizer_fits
    from apriel_jax.checkpoint.pretrained import detect_format
    from apriel_jax.cli import UsageError
    from apriel_jax.data.images import ImageConfig, load_image
    from apriel_jax.data.prompt import encode_prompt, prompt_batch
    from apriel_jax.data.tokenizer import load_tokenizer
    from apriel_jax.model.generate import SamplingConfig, generate

    # Cheap checks first: bad settings, a missing tokenizer or image should not cost a model load.
    detect_format(args.checkpoint)  # raises for a missing directory or one that holds no checkpoint
    if args.adapter:
        from apriel_jax.checkpoint.peft_adapters import read_adapter_config

        read_adapter_config(args.adapter)  # raises for a directory that is not a PEFT adapter
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if args.group_size < 1:
        raise UsageError(f"--group-size must be >= 1, got {args.group_size}")
    if args.quant_embeddings and args.quant == "none":
        raise UsageError("--quant-embeddings goes with --quant int8 or int4 (it quantizes a quantized base's "
                         "embedding and LM head too)")
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
    model = _load_model(args)
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
    from apriel_jax.cli import UsageError
    from apriel_jax.data.chat_template import ChatTemplate

    template = ChatTemplate.from_checkpoint(args.checkpoint)  # None: the built-in Apriel renderer
    model = _load_model(args)
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
