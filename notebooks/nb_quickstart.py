"""01_quickstart.ipynb: load a checkpoint and chat with an image."""

from __future__ import annotations

from nb_cells import INSTALL_CELL, RUNTIME_CELL, TINY_CHECKPOINT, code, header, md


def quickstart():
    return [
        header("apriel-jax quickstart: load a checkpoint and chat with an image", """\
This notebook runs on a Colab CPU, GPU or TPU runtime (or any Jupyter with `apriel-jax` installed):

1. installs `apriel-jax` when the kernel cannot import it yet (a fresh Colab session) and detects the runtime;
2. picks a device mesh: FSDP over every device;
3. loads a checkpoint with `apriel_jax.from_pretrained`: by default a **tiny random model** built on the
   fly, or a real Apriel-1.5 / Pixtral checkpoint in Hugging Face format;
4. chats with it about an image (`apriel_jax.chat.chat`) and prints the reasoning and the final answer
   separately."""),
        code(INSTALL_CELL),
        md("""\
## Runtime and mesh

`jax.devices()` tells which accelerator the runtime has. The mesh has the axes `data`, `fsdp`, `tensor`
and `sequence`; here every device goes on `fsdp`, so each parameter is split across all devices and a
model that does not fit on one chip still loads (on a TPU v2-8 runtime: 8 shards)."""),
        code(RUNTIME_CELL),
        md("""\
## The checkpoint

`CHECKPOINT` is a directory in Hugging Face format (`config.json` + `*.safetensors`, a
`LlavaForConditionalGeneration` with a Pixtral vision tower), a Mistral consolidated directory
(`params.json` + `consolidated.safetensors`) or an apriel-jax orbax checkpoint.

* **Empty (default):** a tiny random model (the `tiny` preset: 2-layer vision tower with 2-D RoPE, GELU
  projector, 2-layer GQA decoder) is created and exported to HF format with the demo tokenizer, in
  seconds on a CPU.
* **The real model:** download `ServiceNow-AI/Apriel-1.5-15b-Thinker` (or a Pixtral-12B in HF layout)
  and set `CHECKPOINT` to its directory, e.g.
  `from huggingface_hub import snapshot_download; CHECKPOINT = snapshot_download("ServiceNow-AI/Apriel-1.5-15b-Thinker")`.
  15B parameters in bfloat16 are about 30 GB: that needs an accelerator runtime with at least that much
  memory in total over its devices (the mesh shards the weights over all of them)."""),
        code(TINY_CHECKPOINT),
        code("""\
CHECKPOINT = ""  # @param {type:"string"}

TINY = not CHECKPOINT
if TINY:
    CHECKPOINT = str(build_tiny_checkpoint("runs/notebooks/tiny_hf"))
    print(f"built a tiny random checkpoint: {CHECKPOINT}")
print(describe(CHECKPOINT))"""),
        md("""\
## Load

`from_pretrained` reads every tensor straight into its shard on the mesh (memory-mapped safetensors).
`dtype="bfloat16"` would load a float32 checkpoint for bfloat16 compute; by default parameters keep
their stored dtype."""),
        code("""\
import time

t0 = time.time()
model = apriel_jax.from_pretrained(CHECKPOINT, mesh=mesh)
tokenizer = load_tokenizer(CHECKPOINT)  # the tokenizer.json of the checkpoint directory
cfg = model.config
print(f"loaded in {time.time() - t0:.1f} s: {param_count(cfg):,} parameters, "
      f"{cfg.vision.num_layers}-layer vision tower, {cfg.decoder.num_layers}-layer decoder, "
      f"vocab {cfg.decoder.vocab_size}, stored dtype {cfg.param_dtype}")"""),
        md("""\
## Chat with an image

`chat(model, tokenizer, messages)` renders the conversation in the Apriel chat format (system prompt,
`<|user|>`, the image as `[IMG]` patch tokens, `<|assistant|>`: Apriel-1.5's chat template),
generates with the KV cache until end-of-sequence, and splits the reply: `reasoning` (the thoughts
before `[BEGIN FINAL RESPONSE]`), `answer` and `tool_calls`.

**The tiny model is random:** it prints gibberish (and, as it never writes `[BEGIN FINAL RESPONSE]`,
everything it writes lands in `answer` and `reasoning` is `None`). With the real Apriel checkpoint the
same cell prints its reasoning, then the answer. Notebook 02 fine-tunes a model until it writes the
format."""),
        code("""\
from IPython.display import display
from PIL import Image

from apriel_jax.chat import chat
from apriel_jax.model.generate import SamplingConfig

image = Image.open(DEMO_DATA / "images" / "house.png").convert("RGB")  # or any PIL image / path / bytes
display(image)
messages = [{"role": "user", "content": [
    {"type": "image", "image": image},
    {"type": "text", "text": "What is in this picture? Answer in one sentence."},
]}]
MAX_NEW_TOKENS = 16 if SMOKE else 64 if TINY else 2048  # Apriel reasons at length before answering
# Greedy; for the real model Apriel's usual sampling is SamplingConfig(temperature=0.6, top_p=0.95, ...).
sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)

t0 = time.time()
reply = chat(model, tokenizer, messages, sampling=sampling)
print(f"({len(reply.tokens)} new tokens in {time.time() - t0:.1f} s, compilation included)\\n")
print("reasoning:", reply.reasoning)
print("answer:", reply.answer)
if reply.tool_calls:
    print("tool calls:", reply.tool_calls)"""),
        md("""\
To continue the conversation, append the reply and the next question:
`messages += [{"role": "assistant", "reasoning": reply.reasoning, "content": reply.answer},
{"role": "user", "content": "..."}]`. `mode="think"` / `mode="nothink"` use the `<think>` and
`<nothink>` tags instead of the Apriel format, and `tools=[...]` adds function signatures to the
system prompt (the calls come back in `reply.tool_calls`).

Next: `02_finetune.ipynb` (SFT with frozen groups), `03_conversion.ipynb` (HF ↔ orbax with a parity
check), `04_recipe.ipynb` (the whole Apriel training recipe on a tiny model)."""),
    ]
