"""05_colab_lora.ipynb: the 15B on one accelerator: a quantized base, chat, LoRA fine-tuning, PEFT adapters."""

from __future__ import annotations

from nb_cells import INSTALL_CELL, RUNTIME_CELL, TINY_CHECKPOINT, code, header, md


def colab_lora():
    return [
        header("Apriel-15B on one accelerator: int8 / int4 base, chat, LoRA fine-tuning, PEFT adapters", """\
The 15B model in bfloat16 is 30 GB: more than a Colab accelerator holds (TPU v5e-1: 16 GB, L4: 24 GB,
v6e-1: 32 GB, A100: 40 GB, with activations still to fit). This notebook loads the frozen base
**quantized** (int8 per output channel, or int4 in groups of 128 along the input), chats with it about an
image, trains **LoRA adapters** on your own JSONL chats for a few steps, exports them in the **PEFT**
layout (`adapter_config.json` + `adapter_model.safetensors`, which `peft` loads onto the transformers
model) and loads them back.

By default it runs on a tiny random model so that it finishes in a couple of minutes on a CPU; set
`CHECKPOINT` to an Apriel-1.5 / Pixtral checkpoint directory in Hugging Face format for the real one.
What fits where is measured ahead of time by `apriel-jax aot configs/train/colab_lora_15b.py:v5e-int4`
(and `:v6e-int8`, `--generate 4096`): the table is in the repository's README."""),
        code(INSTALL_CELL),
        code(RUNTIME_CELL),
        code(TINY_CHECKPOINT),
        md("""\
## Parameters

* `CHECKPOINT`: an HF directory (`config.json` + `*.safetensors` + `tokenizer.json`), e.g.
  `snapshot_download("ServiceNow-AI/Apriel-1.5-15b-Thinker")`; empty: a tiny random model.
* `QUANT`: `int8`, `int4`, `none` or `auto`: chosen from the accelerator's memory for the real model
  (int4 under 24 GB, int8 under 48 GB, else none); the tiny model uses int8 so that the quantized path
  runs here too. With int4 (and on the tiny model) the token embedding and the LM head are stored in int8
  as well (`quant_embeddings`): 1.3 GB less for the 15B, which a 16 GB chip needs.
* `DATA_JSONL`: your chats, one JSON object per line: `{"messages": [{"role": "user", "content": ...},
  {"role": "assistant", "content": ...}]}` (images as `{"type": "image", "path": ...}` parts); empty:
  the 20 chats shipped with the package. The loss is on the assistant turns only."""),
        code("""\
CHECKPOINT = ""  # @param {type:"string"}
QUANT = "auto"  # @param ["auto", "int8", "int4", "none"]
DATA_JSONL = ""  # @param {type:"string"}
LORA_RANK = 16  # @param {type:"integer"}
RUN_DIR = Path("runs/notebooks/colab_lora")

TINY = not CHECKPOINT
if TINY:
    CHECKPOINT = str(build_tiny_checkpoint("runs/notebooks/colab_lora_base"))
if QUANT == "auto":
    memory = (devices[0].memory_stats() or {}).get("bytes_limit", 0) if RUNTIME != "CPU" else 0
    QUANT = "int8" if TINY or not memory else "int4" if memory < 24e9 else "int8" if memory < 48e9 else "none"
QUANT_EMBEDDINGS = QUANT != "none" and (TINY or QUANT == "int4")
GROUP_SIZE = 32 if TINY else 128  # int4 groups along each projection's input (the tiny widths are 64)
LORA_RANK = 4 if TINY else LORA_RANK  # the tiny model's projections are 32-128 wide
DATA_JSONL = DATA_JSONL or str(DEMO_DATA / "chat_sft.jsonl")
print(f"checkpoint {CHECKPOINT}; base quantized to {QUANT} (embeddings too: {QUANT_EMBEDDINGS}); "
      f"LoRA rank {LORA_RANK}; data {DATA_JSONL}")"""),
        md("""\
## Load the base, quantized

Each decoder projection is quantized as it is read (one tensor at a time: host memory stays near one
tensor) and placed on the mesh like the bfloat16 weight would be; with `QUANT_EMBEDDINGS` the token
embedding and the LM head become int8 with one scale per vocabulary row. The norms, vision tower and
projector keep their dtype. In the matmul the int8 / int4 values are converted inside the dot's operand,
so no bfloat16 copy of a whole weight is ever made."""),
        code("""\
import time

import numpy as np

from apriel_jax.model.quant import weight_bytes

t0 = time.time()
model = apriel_jax.from_pretrained(CHECKPOINT, mesh=mesh, quant=QUANT, group_size=GROUP_SIZE,
                                   quant_embeddings=QUANT_EMBEDDINGS)
tokenizer = load_tokenizer(CHECKPOINT)
sizes = weight_bytes(nnx.state(model))
print(f"quantized base: {QUANT}, loaded in {time.time() - t0:.1f} s; weight bytes: "
      + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(sizes.items())))"""),
        md("""\
## Chat with an image

The tiny model is random and writes gibberish; the real checkpoint reasons, then answers."""),
        code("""\
from PIL import Image

from apriel_jax.chat import chat
from apriel_jax.model.generate import SamplingConfig

image = Image.open(DEMO_DATA / "images" / "house.png").convert("RGB")
question = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "What is in this picture?"}]}]
sampling = SamplingConfig(max_new_tokens=16 if SMOKE else 64 if TINY else 1024)
reply = chat(model, tokenizer, question, sampling=sampling)
print("reasoning:", reply.reasoning)
print("answer:", reply.answer)"""),
        md("""\
## Fine-tune LoRA adapters

The run config is `apriel-jax train`'s; its `model` block decides how the checkpoint's model is computed
(for the real model: full remat, the Pallas attention kernel and, with int4, one saved residual stream per
4 layers). `lora.rank > 0` adds adapters (A random, B zero: the model starts exactly where the base is) to
the seven projections of every decoder layer; only they get gradients and Adam moments: the quantized
weights are a separate variable type that no optimizer sees. The run checkpoints, and rerunning the cell
resumes from its latest checkpoint."""),
        code("""\
from apriel_jax.train.config import source, train_config
from apriel_jax.train.loop import train

STEPS = 4 if SMOKE else 60 if TINY else 200
cfg = train_config()
cfg.run_dir = str(RUN_DIR)
cfg.init.from_pretrained = CHECKPOINT
cfg.quant.update(mode=QUANT, group_size=GROUP_SIZE, embeddings=QUANT_EMBEDDINGS)
cfg.lora.update(rank=LORA_RANK, alpha=32.0, dropout=0.05)
cfg.trainable = ("decoder",)  # with LoRA: the adapters inside the decoder
cfg.data.update(sources=[source("chats", "jsonl", [DATA_JSONL])], tokenizer=CHECKPOINT, chat_format="apriel",
                loss="responses", seq_len=256 if TINY else 4096, global_batch=4 if TINY else 1,
                patch_budget=64 if TINY else 1024)
cfg.optimizer.update(peak_lr=3e-3 if TINY else 1e-4, schedule="cosine", weight_decay=0.0)
if not TINY:  # how the 15B fits one chip, as `apriel-jax aot configs/train/colab_lora_15b.py` measures it
    cfg.model.update(remat_policy="full", attention_impl="auto", remat_group=4 if QUANT == "int4" else 1)
    cfg.chunk_size = 512 if QUANT == "int4" else 1024
cfg.steps = STEPS
cfg.checkpoint.update(save_every=max(STEPS // 2, 1), keep_last=1)
cfg.log.update(console=False, tensorboard=False)
t0 = time.time()
result = train(cfg)
print(f"{result['status']} at step {result['step']} in {time.time() - t0:.0f} s: train loss {result['loss']:.3f}")"""),
        md("""\
## Export the adapters (PEFT) and load them back

`export_peft` writes only the adapters, in PEFT's names and shapes; on the transformers side
`PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(CHECKPOINT), ADAPTER_DIR)` loads
them (on the unquantized base). Here they are loaded back onto a freshly loaded quantized base: the
logits must be exactly those of the trained model."""),
        code("""\
from apriel_jax.checkpoint.peft_adapters import export_peft, load_peft
from apriel_jax.train.loop import setup

run = setup(cfg)  # restores the latest checkpoint of RUN_DIR
run.ckpt.close()
trained = nnx.merge(run.graphdef, run.state.params, run.state.frozen)
ADAPTER_DIR = RUN_DIR / "adapter"
export_peft(nnx.state(trained), run.model_cfg, ADAPTER_DIR, base_model_name_or_path=CHECKPOINT, overwrite=True)
print(f"step {int(run.state.step)} adapters exported: {describe(ADAPTER_DIR)}")

base = apriel_jax.from_pretrained(CHECKPOINT, mesh=mesh, quant=QUANT, group_size=GROUP_SIZE,
                                  quant_embeddings=QUANT_EMBEDDINGS)
reloaded = load_peft(ADAPTER_DIR, base)
batch = {"tokens": np.arange(20, 52, dtype=np.int32)[None], "positions": np.arange(32, dtype=np.int32)[None],
         "segment_ids": np.ones((1, 32), np.int32)}
same = np.array_equal(np.asarray(trained(batch)), np.asarray(reloaded(batch)))
print("reloaded adapter, logits identical to the trained model's:", same)
assert same
reply = chat(reloaded, tokenizer, [{"role": "user", "content": "A shop sells 4 apples for $2. How much do 10 cost?"}],
             sampling=sampling)
print("answer:", reply.answer)"""),
        md("""\
From the command line the same adapters apply with
`apriel-jax generate --checkpoint CHECKPOINT --adapter ADAPTER_DIR --chat apriel --prompt "..."`."""),
    ]
