"""Chat with a model: render a conversation in the Apriel chat format, generate, split the reply.

    from apriel_jax import from_pretrained
    from apriel_jax.chat import chat
    from apriel_jax.data.tokenizer import load_tokenizer

    model = from_pretrained("path/to/Apriel-1.5-15b-Thinker", dtype="bfloat16")
    reply = chat(model, load_tokenizer("path/to/Apriel-1.5-15b-Thinker"),
                 [{"role": "user", "content": [{"type": "image", "image": pil_image},
                                               {"type": "text", "text": "What is in this picture?"}]}])
    reply.reasoning, reply.answer, reply.tool_calls, reply.text

The prompt ends with the generation prompt (``<|assistant|>\n``, plus the mode tag in ``think`` /
``nothink`` modes), so the model continues as the assistant; generation stops at end-of-sequence. Pass
the checkpoint's own template (``ChatTemplate.from_checkpoint(path)``) to render mode ``apriel`` with it,
as transformers would; ``think`` / ``nothink`` are built-in modes that no Apriel-1.5 template has.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from apriel_jax.checkpoint.hf_config import ConfigError
from apriel_jax.data.chat import ChatFormat, parse_response
from apriel_jax.data.chat_template import ChatTemplate
from apriel_jax.data.images import ImageConfig
from apriel_jax.data.prompt import prompt_batch
from apriel_jax.model.generate import SamplingConfig, generate


@dataclasses.dataclass
class Reply:
    text: str  # the decoded continuation (special tokens dropped)
    reasoning: str | None
    answer: str
    tool_calls: list
    tokens: list[int]


def check_tokenizer_fits(cfg, tokenizer, prompt_ids) -> None:
    """ConfigError (a ValueError) when ``tokenizer`` cannot belong to a model with config ``cfg``: a different
    ``[IMG]`` id, or prompt ids outside the model's vocabulary."""
    if tokenizer.image_id != cfg.image_token_id:
        raise ConfigError(f"tokenizer's [IMG] id {tokenizer.image_id} differs from the model's image_token_id "
                          f"{cfg.image_token_id}: the tokenizer does not belong to this checkpoint")
    if prompt_ids and max(prompt_ids) >= cfg.decoder.vocab_size:
        raise ConfigError(f"the prompt has token id {max(prompt_ids)}, outside the model's vocabulary "
                          f"({cfg.decoder.vocab_size}): the tokenizer does not belong to this checkpoint")


def chat(model, tokenizer, messages: Sequence[dict], *, mode: str = "apriel", tools=None,
         sampling: SamplingConfig | None = None, seed: int = 0, longest_edge: int = 1024,
         template: ChatTemplate | None = None) -> Reply:
    """One assistant turn for ``messages`` (the chat-record format of the data pipeline).

    ``template``: the checkpoint's chat template; mode ``apriel`` renders with it when given (the other
    modes are built in and do not use it)."""
    cfg = model.config
    fmt = ChatFormat(mode=mode, image_cfg=ImageConfig(longest_edge=min(longest_edge, cfg.vision.image_size),
                                                      patch_size=cfg.vision.patch_size),
                     template=template if mode == "apriel" else None)
    doc = fmt.encode(list(messages), tokenizer, tools=tools, add_generation_prompt=True)
    check_tokenizer_fits(cfg, tokenizer, doc.tokens.tolist())
    batch = prompt_batch([(doc.tokens.tolist(), doc.images)],
                         pad_id=tokenizer.pad_id, image_id=tokenizer.image_id)
    sampling = dataclasses.replace(sampling or SamplingConfig(max_new_tokens=256),
                                   stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
    new, _ = generate(model, batch, sampling, rng=jax.random.key(seed))
    ids = np.asarray(new)[0].tolist()
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    text = tokenizer.decode(ids)
    parsed = parse_response(text)
    return Reply(text=text, reasoning=parsed.reasoning, answer=parsed.answer,
                 tool_calls=list(parsed.tool_calls or []), tokens=ids)
