"""LoRA fine-tuning of the 15B model on one accelerator (Colab's TPU v5e-1 / v6e-1), the base quantized.

    apriel-jax aot configs/train/colab_lora_15b.py:v5e-int4                  # the training step's fit
    apriel-jax aot configs/train/colab_lora_15b.py:v6e-int8
    apriel-jax aot configs/train/colab_lora_15b.py:v6e-int8 --generate 4096  # KV-cached generation
    apriel-jax train configs/train/colab_lora_15b.py:v6e-int8 --config.init.from_pretrained=CKPT \\
        --config.data.sources='[...]' --config.run_dir=...

ARG is TOPOLOGY-MODE: ``v5e-int4`` (16 GB of HBM: the base in int4, groups of 128, and the token embedding
and LM head in int8), ``v6e-int8`` (32 GB: int8 per output channel) or ``v6e-bf16`` (the unquantized base,
which does not fit: the comparison row). Rank-16 adapters on the seven projections of every decoder layer
train; everything else is frozen (the quantized weights; the rest in bfloat16: the embeddings and LM head
unless quantized, the vision tower, the projector). One row of 4096 tokens, with up
to 1024 image patches (four 256-patch images), per step.
"""

from apriel_jax.model import get_preset
from apriel_jax.model.lora import lora_config
from apriel_jax.train.config import train_config

CHOICES = {"v5e-int4": ("v5e:1x1", "int4"), "v6e-int8": ("v6e:1x1", "int8"), "v6e-bf16": ("v6e:1x1", "none")}


def get_config(arg: str = "v6e-int8"):
    if arg not in CHOICES:
        raise ValueError(f"unknown choice {arg!r}: use one of {', '.join(CHOICES)}")
    topology, mode = CHOICES[arg]
    cfg = train_config()
    model = get_preset("apriel_15b")
    model.dtype = model.param_dtype = "bfloat16"
    model.remat_policy = "full"
    model.attention_impl = "auto"  # the Pallas flash kernel on TPU and GPU
    cfg.model = model
    # On 16 GB the int8 embedding and LM head (1.3 GB less than bf16) are needed to fit (model/quant.py).
    cfg.quant.update(mode=mode, group_size=128, embeddings=topology.startswith("v5e"))
    cfg.init.param_dtype = cfg.init.dtype = "bfloat16"
    cfg.lora = lora_config(rank=16, alpha=32.0, dropout=0.05)
    cfg.trainable = ("decoder",)  # with LoRA: the adapters inside the decoder, nothing else
    cfg.data.update(seq_len=4096, global_batch=1, patch_budget=1024, loss="responses", tokenizer="pixtral")
    cfg.optimizer.update(peak_lr=1e-4, schedule="cosine", weight_decay=0.0)
    cfg.chunk_size = 1024
    if topology.startswith("v5e"):
        # 16 GB: save the residual stream once per 4 layers (12 + 4 instead of 48 saved, for one more forward
        # pass per layer) and halve the loss chunk's fp32 logits: 80% of HBM instead of 86% (README).
        model.remat_group = 4
        cfg.chunk_size = 512
    cfg.steps = 200
    cfg.run_dir = "runs/colab_lora_15b"
    cfg.target = {"topology": topology}
    return cfg
