"""Model configuration: a typed ``ml_collections.ConfigDict`` and the named presets.

One schema serves every tower. ConfigDicts are type-locked once built, so a command-line override with
the wrong type (``--config.model.decoder.num_layers=abc``) fails loudly instead of silently becoming a
string. Sizes of the real models are in ``presets.py``; the HF ``config.json`` mapping is in
``apriel_jax/checkpoint/hf_config.py``. A model with LoRA adapters carries a ``lora`` block as well
(``model/lora.py``: ``with_lora``), a quantized base a ``quant`` block (``model/quant.py``: ``with_quant``);
configs without them build the plain model.
"""

from __future__ import annotations

import ml_collections

from apriel_jax.model.lora import config_problems
from apriel_jax.model.quant import config_problems as quant_problems

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attention")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "quick_gelu")


def vision_config(**overrides) -> ml_collections.ConfigDict:
    """Pixtral vision encoder. Defaults are Pixtral-12B's (model_spec.md section 1.1)."""
    cfg = ml_collections.ConfigDict(
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_layers=24,
            num_heads=16,
            head_dim=64,
            num_channels=3,
            patch_size=16,
            image_size=1024,  # longest image side in pixels: bounds the 2-D RoPE grid (64x64 patches)
            rope_theta=10_000.0,
            hidden_act="silu",  # original Pixtral; some derived HF configs say "gelu" - both work
            norm_eps=1e-5,
        )
    )
    cfg.update(overrides)
    return cfg


def projector_config(**overrides) -> ml_collections.ConfigDict:
    """Llava multimodal projector: linear -> activation -> linear."""
    # vision_feature_layer: which vision hidden state feeds the projector (HF semantics: -1 = last layer).
    cfg = ml_collections.ConfigDict(dict(bias=True, hidden_act="gelu", vision_feature_layer=-1))
    cfg.update(overrides)
    return cfg


def decoder_config(**overrides) -> ml_collections.ConfigDict:
    """Mistral-NeMo style decoder. Defaults are Pixtral-12B's text model (model_spec.md section 3)."""
    cfg = ml_collections.ConfigDict(
        dict(
            vocab_size=131_072,
            hidden_size=5120,
            intermediate_size=14_336,
            num_layers=40,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,  # decoupled from hidden_size: 32 * 128 != 5120
            rope_theta=1e9,
            norm_eps=1e-5,
            hidden_act="silu",
            tie_embeddings=False,
            max_position_embeddings=1_024_000,
            sliding_window=0,  # 0 = full causal attention (Pixtral/Apriel); >0 = Mistral-7B style window
        )
    )
    cfg.update(overrides)
    return cfg


def model_config(vision=None, projector=None, decoder=None, **overrides) -> ml_collections.ConfigDict:
    """The whole Llava model: vision tower + projector + decoder and how they run."""
    cfg = ml_collections.ConfigDict(
        dict(
            vision=vision if vision is not None else vision_config(),
            projector=projector if projector is not None else projector_config(),
            decoder=decoder if decoder is not None else decoder_config(),
            image_token_id=10,  # HF `image_token_index`; the data pipeline reads it from the tokenizer
            dtype="float32",  # compute dtype (bfloat16 on accelerators)
            param_dtype="float32",  # storage dtype of parameters (fp32 master weights for training)
            remat_policy="none",  # one of REMAT_POLICIES
            remat_group=1,  # > 1: nested remat over groups of this many decoder layers (must divide them)
            attention_impl="xla",  # kernels/attention.py implementation name
        )
    )
    cfg.update(overrides)
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field when a model config cannot describe a working model."""
    v, d = cfg.vision, cfg.decoder
    problems = []
    if v.head_dim % 4:
        problems.append(f"vision.head_dim={v.head_dim} must be divisible by 4 (2-D RoPE splits it in row/col halves)")
    if d.head_dim % 2:
        problems.append(f"decoder.head_dim={d.head_dim} must be even (rotate-half RoPE)")
    if d.num_heads % d.num_kv_heads:
        problems.append(f"decoder.num_heads={d.num_heads} is not a multiple of decoder.num_kv_heads={d.num_kv_heads}")
    if v.hidden_act not in ACTIVATIONS:
        problems.append(f"vision.hidden_act={v.hidden_act!r} is not one of {ACTIVATIONS}")
    if d.hidden_act not in ACTIVATIONS:
        problems.append(f"decoder.hidden_act={d.hidden_act!r} is not one of {ACTIVATIONS}")
    if cfg.projector.hidden_act not in ACTIVATIONS:
        problems.append(f"projector.hidden_act={cfg.projector.hidden_act!r} is not one of {ACTIVATIONS}")
    if cfg.remat_policy not in REMAT_POLICIES:
        problems.append(f"remat_policy={cfg.remat_policy!r} is not one of {REMAT_POLICIES}")
    group = cfg.get("remat_group", 1)
    if group < 1 or d.num_layers % group:
        problems.append(f"remat_group={group} must be >= 1 and divide decoder.num_layers={d.num_layers}")
    if not 0 <= cfg.image_token_id < d.vocab_size:
        problems.append(f"image_token_id={cfg.image_token_id} is outside the vocabulary (size {d.vocab_size})")
    for name, value in (("vision.num_layers", v.num_layers), ("decoder.num_layers", d.num_layers)):
        if value < 1:
            problems.append(f"{name}={value} must be at least 1")
    problems.extend(config_problems(cfg))
    problems.extend(quant_problems(cfg))
    if problems:
        raise ValueError("invalid model config:\n  " + "\n  ".join(problems))
