"""Tiny random Hugging Face reference models and inputs for parity tests.

This is a plain support module (not a test file).  It builds small, fully
randomised ``transformers.LlavaForConditionalGeneration`` models with a Pixtral
vision tower and a Mistral text model -- the architecture of Apriel-1.5 and
Pixtral-12B -- plus matching HF-style inputs, so that tests can compare the JAX
implementation against transformers on CPU in seconds.

Everything here depends only on numpy, torch and transformers; it
deliberately imports nothing from ``apriel_jax`` so that it stays an
independent reference (``tests/mistral_reference.py`` writes the same models in
Mistral's consolidated layout, also on its own).

Typical use::

    from hf_reference import TINY_VARIANTS, make_hf_config, make_hf_model, make_inputs, hf_logits

    cfg = make_hf_config(**TINY_VARIANTS["base"])
    model = make_hf_model(cfg, seed=0)
    inputs = make_inputs([[(32, 48)], [(16, 16), (32, 32)]], vocab_size=cfg.text_config.vocab_size)
    ref = hf_logits(model, inputs)          # [B, S, V] float32

Token-id conventions (those of Mistral's tekken tokenizer used by Pixtral):
``<unk>``=0, ``<s>`` (BOS)=1, ``</s>`` (EOS)=2, ``[IMG]``=10, ``[PAD]``=11,
``[IMG_BREAK]``=12, ``[IMG_END]``=13.  Random text ids are drawn from
``[FIRST_TEXT_ID, vocab_size)`` so they never collide with special ids.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import numpy as np
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig, PixtralVisionConfig
from transformers.utils import logging as hf_logging

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "IMAGE_TOKEN_ID",
    "PAD_ID",
    "IMAGE_BREAK_ID",
    "IMAGE_END_ID",
    "FIRST_TEXT_ID",
    "PATCH_SIZE",
    "TINY_VARIANTS",
    "make_hf_config",
    "make_hf_model",
    "save_hf_model",
    "load_hf_model",
    "image_token_layout",
    "make_inputs",
    "position_ids_from_mask",
    "hf_logits",
    "hf_greedy",
]

BOS_ID = 1
EOS_ID = 2
IMAGE_TOKEN_ID = 10
PAD_ID = 11
IMAGE_BREAK_ID = 12
IMAGE_END_ID = 13
#: Random text tokens are sampled from ids >= this value.
FIRST_TEXT_ID = 20
#: Patch size of every tiny variant (image sides must be multiples of it).
PATCH_SIZE = 16

# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------

_BASE: dict[str, Any] = dict(
    # Pixtral vision tower.
    vision_hidden_size=64,
    vision_intermediate_size=128,
    vision_num_hidden_layers=2,
    vision_num_attention_heads=4,  # head_dim 16
    patch_size=PATCH_SIZE,
    image_size=256,
    num_channels=3,
    vision_rope_theta=10000.0,
    vision_hidden_act="silu",
    # Mistral text model.
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # decoupled from hidden_size: 4 * 32 != 64
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    # Llava glue.
    projector_bias=True,
    projector_hidden_act="gelu",
    image_token_index=IMAGE_TOKEN_ID,
    vision_feature_layer=-1,
    vision_feature_select_strategy="full",
)

#: Named keyword sets for :func:`make_hf_config` (each one complete, so
#: ``make_hf_config(**TINY_VARIANTS[name])`` is all that is needed).
#:
#: * ``"base"``: SiLU vision MLP, projector with bias, GQA 2:1, head_dim 32
#:   decoupled from hidden 64, text rope_theta 1e6.
#: * ``"gelu_vision"``: GELU vision MLP, projector without bias, GQA 4:1
#:   (one kv head), text rope_theta 1e9 (Pixtral-12B's value).
#: * ``"mha"``: plain multi-head attention (4 kv heads), head_dim 16
#:   (= hidden / heads), 3 text and 3 vision layers, rms_norm_eps 1e-6.
TINY_VARIANTS: dict[str, dict] = {
    "base": dict(_BASE),
    "gelu_vision": {
        **_BASE,
        "vision_hidden_act": "gelu",
        "projector_bias": False,
        "num_key_value_heads": 1,
        "rope_theta": 1e9,
    },
    "mha": {
        **_BASE,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "num_hidden_layers": 3,
        "vision_num_hidden_layers": 3,
        "rms_norm_eps": 1e-6,
    },
}


def make_hf_config(
    *,
    vision_hidden_size: int = _BASE["vision_hidden_size"],
    vision_intermediate_size: int = _BASE["vision_intermediate_size"],
    vision_num_hidden_layers: int = _BASE["vision_num_hidden_layers"],
    vision_num_attention_heads: int = _BASE["vision_num_attention_heads"],
    patch_size: int = _BASE["patch_size"],
    image_size: int = _BASE["image_size"],
    num_channels: int = _BASE["num_channels"],
    vision_rope_theta: float = _BASE["vision_rope_theta"],
    vision_hidden_act: str = _BASE["vision_hidden_act"],
    vocab_size: int = _BASE["vocab_size"],
    hidden_size: int = _BASE["hidden_size"],
    intermediate_size: int = _BASE["intermediate_size"],
    num_hidden_layers: int = _BASE["num_hidden_layers"],
    num_attention_heads: int = _BASE["num_attention_heads"],
    num_key_value_heads: int = _BASE["num_key_value_heads"],
    head_dim: int = _BASE["head_dim"],
    rope_theta: float = _BASE["rope_theta"],
    rms_norm_eps: float = _BASE["rms_norm_eps"],
    max_position_embeddings: int = _BASE["max_position_embeddings"],
    tie_word_embeddings: bool = _BASE["tie_word_embeddings"],
    projector_bias: bool = _BASE["projector_bias"],
    projector_hidden_act: str = _BASE["projector_hidden_act"],
    image_token_index: int = _BASE["image_token_index"],
    vision_feature_layer: int = _BASE["vision_feature_layer"],
    vision_feature_select_strategy: str = _BASE["vision_feature_select_strategy"],
    pad_token_id: int = PAD_ID,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
) -> LlavaConfig:
    """Build a Pixtral-style ``LlavaConfig`` (Pixtral vision tower + Mistral text model).

    All arguments are keyword-only; defaults are the ``"base"`` variant (see
    :data:`TINY_VARIANTS`).  ``vision_*`` arguments configure the
    ``PixtralVisionConfig`` (its head_dim is always hidden / heads), the plain
    names the ``MistralConfig`` (``head_dim`` may differ from hidden / heads),
    ``projector_*`` the two-layer multimodal projector.

    Rope thetas are given as ``rope_parameters`` dicts (the transformers 5.x
    form; ``rope_type`` "axial" for the vision tower, "default" for the text
    model).  The text model has no sliding window.  ``pad_token_id`` (11),
    ``bos_token_id`` (1) and ``eos_token_id`` (2) are set on the text config
    and on the top-level config.  The attention implementation is forced to
    "eager" on the top-level config and both sub-configs: eager is the
    reference (sdpa agrees to ~1e-6 on non-padded positions, but eager is
    deterministic w.r.t. fully masked rows and has no kernel-selection
    variability).
    """
    vision = PixtralVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        num_hidden_layers=vision_num_hidden_layers,
        num_attention_heads=vision_num_attention_heads,
        num_channels=num_channels,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=vision_hidden_act,
        rope_parameters={"rope_type": "axial", "rope_theta": float(vision_rope_theta)},
        attn_implementation="eager",
    )
    text = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        sliding_window=None,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attn_implementation="eager",
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        image_seq_length=1,
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=vision_feature_layer,
        multimodal_projector_bias=projector_bias,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="eager",
    )
    for name, value in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        setattr(config, name, value)
    config.architectures = ["LlavaForConditionalGeneration"]
    _force_eager(config)
    return config


def _force_eager(config: LlavaConfig) -> None:
    """Set ``_attn_implementation = "eager"`` on the config and its sub-configs."""
    config._attn_implementation = "eager"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "eager"


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

#: Linear/conv weights get std = _WEIGHT_GAIN / sqrt(fan_in) (0.1 for fan-in
#: 64, ~0.07 for 128): activations keep roughly unit scale through the stack.
_WEIGHT_GAIN = 0.8
#: The LM head is a little larger so the greedy argmax has clear margins.
_LM_HEAD_GAIN = 2.0
_EMBED_STD = 1.0
_NORM_STD = 0.1
_BIAS_STD = 0.02


def _randomise_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter of ``model`` in place with random values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = tuple(param.shape)
            if name.endswith("bias"):
                new = _BIAS_STD * torch.randn(shape, generator=generator)
            elif param.ndim == 1:
                if "norm" not in name and "ln_pre" not in name:
                    raise AssertionError(f"unexpected 1-D parameter {name}")
                new = 1.0 + _NORM_STD * torch.randn(shape, generator=generator)
            elif "embed_tokens" in name:
                new = _EMBED_STD * torch.randn(shape, generator=generator)
            else:
                fan_in = int(np.prod(shape[1:]))
                gain = _LM_HEAD_GAIN if name.endswith("lm_head.weight") else _WEIGHT_GAIN
                new = (gain / np.sqrt(fan_in)) * torch.randn(shape, generator=generator)
            param.copy_(new.to(param.dtype))


def make_hf_model(config: LlavaConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    """Instantiate ``LlavaForConditionalGeneration(config)`` with all weights random.

    float32, eval mode, eager attention.  Seeds ``torch.manual_seed(seed)``
    and then overwrites *every* parameter from a generator seeded with
    ``seed`` (so the result does not depend on transformers' init):

    * RMSNorm weights (text, vision ``ln_pre``/``attention_norm``/``ffn_norm``,
      final norm): ``1 + 0.1 * randn``;
    * biases (projector): ``0.02 * randn``;
    * token embeddings: ``randn``;
    * linear / conv weights: ``randn * 0.8 / sqrt(fan_in)`` (std 0.1 for fan-in
      64), LM head ``randn * 2 / sqrt(fan_in)``.

    A wrong mapping or transposition of any tensor therefore changes logits.
    The same ``(config, seed)`` always gives bit-identical weights.
    """
    _force_eager(config)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model = model.to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    _randomise_(model, generator)
    model.eval()
    _force_eager(model.config)
    return model


def save_hf_model(model: LlavaForConditionalGeneration, out_dir: str | os.PathLike, *, max_shard_size: str | int | None = None) -> str:
    """Save ``model`` with ``save_pretrained`` as safetensors; return ``out_dir`` as ``str``.

    ``max_shard_size`` (e.g. ``"200KB"``) forces a sharded checkpoint
    (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``);
    ``None`` keeps transformers' default (a single ``model.safetensors`` for
    these tiny models).  Also writes ``config.json`` and
    ``generation_config.json``.  transformers 5.x always writes safetensors
    (its ``save_pretrained`` has no ``safe_serialization`` any more); the
    argument is passed only where the installed version still accepts it.
    On-disk names are those ``save_pretrained`` writes by default -- in 5.x
    the legacy 4.x layout (``language_model.model.layers.*``,
    ``language_model.lm_head.weight``, ``vision_tower.*``,
    ``multi_modal_projector.*``).  Nothing is printed (transformers' progress
    bar is switched off for the call).
    """
    out_dir = os.fspath(out_dir)
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    with _quiet():
        model.save_pretrained(out_dir, **kwargs)
    return out_dir


def load_hf_model(path: str | os.PathLike) -> LlavaForConditionalGeneration:
    """``from_pretrained(path)`` as a reference model: float32, eager attention, eval mode.

    (A plain ``from_pretrained`` picks sdpa, which differs from eager only at
    padded positions, but eager is the reference.)
    """
    with _quiet():
        model = LlavaForConditionalGeneration.from_pretrained(
            os.fspath(path), attn_implementation="eager", dtype=torch.float32
        )
    model.eval()
    _force_eager(model.config)
    return model


@contextlib.contextmanager
def _quiet():
    """Temporarily disable transformers' tqdm progress bars."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def image_token_layout(h: int, w: int, img_id: int = IMAGE_TOKEN_ID, break_id: int = IMAGE_BREAK_ID, end_id: int = IMAGE_END_ID) -> list[int]:
    """Pixtral's token layout for an image of ``h`` x ``w`` patches.

    ``h`` rows of ``w`` x ``[IMG]`` each followed by ``[IMG_BREAK]``, except
    that the last row ends with ``[IMG_END]`` instead: ``h * (w + 1)`` ids.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image must have at least one patch, got {h}x{w}")
    out: list[int] = []
    for row in range(h):
        out.extend([img_id] * w)
        out.append(end_id if row == h - 1 else break_id)
    return out


def make_inputs(
    sizes_per_row: list[list[tuple[int, int]]],
    *,
    vocab_size: int,
    seq_len: int | None = None,
    seed: int = 0,
    text_len: tuple[int, int] = (3, 9),
    image_token_id: int = IMAGE_TOKEN_ID,
    break_id: int = IMAGE_BREAK_ID,
    end_id: int = IMAGE_END_ID,
    left_pad: bool = True,
) -> dict:
    """Random HF-style batch of text interleaved with images.

    ``sizes_per_row[b]`` lists the images of row ``b`` as pixel sizes
    ``(H, W)``, multiples of :data:`PATCH_SIZE` (16); a row may have none.
    Row ``b`` is ``[BOS] t_0 I_0 t_1 I_1 ... t_n`` where each ``t_k`` is a run
    of random text ids in ``[FIRST_TEXT_ID, vocab_size)`` whose length is
    drawn uniformly from ``text_len`` (inclusive bounds), and ``I_k`` is
    :func:`image_token_layout` of image ``k`` (``H/16`` x ``W/16`` patches).

    Rows are padded with ``PAD_ID`` (11) to the longest row, or to
    ``seq_len`` if given (error if a row is longer) -- on the left if
    ``left_pad`` else on the right.

    Returns a dict of numpy arrays:

    * ``input_ids`` int64 ``[B, S]``, ``attention_mask`` int64 ``[B, S]``;
    * if there is at least one image: ``pixel_values`` float32
      ``[N_img, 3, Hmax, Wmax]`` in row-major image order (row 0's images
      first, i.e. the order of the ``[IMG]`` tokens in ``input_ids``),
      standard-normal inside each image's ``H x W`` area and zero-padded
      bottom/right as HF's Pixtral processor does, and ``image_sizes`` int64
      ``[N_img, 2]`` of ``(H, W)``.

    Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    lo, hi = text_len
    if not (0 <= lo <= hi):
        raise ValueError(f"bad text_len {text_len}")
    if vocab_size <= FIRST_TEXT_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_TEXT_ID}")

    def text(n: int) -> list[int]:
        return rng.integers(FIRST_TEXT_ID, vocab_size, size=n).tolist()

    rows: list[list[int]] = []
    images: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    for row_sizes in sizes_per_row:
        ids = [BOS_ID]
        for size in row_sizes:
            height, width = (int(v) for v in size)
            if height <= 0 or width <= 0 or height % PATCH_SIZE or width % PATCH_SIZE:
                raise ValueError(f"image size {size} must be positive multiples of {PATCH_SIZE}")
            ids += text(int(rng.integers(lo, hi + 1)))
            ids += image_token_layout(height // PATCH_SIZE, width // PATCH_SIZE, image_token_id, break_id, end_id)
            images.append(rng.standard_normal((3, height, width)).astype(np.float32))
            sizes.append((height, width))
        ids += text(int(rng.integers(lo, hi + 1)))
        rows.append(ids)

    longest = max(len(r) for r in rows)
    length = longest if seq_len is None else int(seq_len)
    if length < longest:
        raise ValueError(f"seq_len={seq_len} is shorter than the longest row ({longest})")

    input_ids = np.full((len(rows), length), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)
    for b, ids in enumerate(rows):
        sl = slice(length - len(ids), length) if left_pad else slice(0, len(ids))
        input_ids[b, sl] = ids
        attention_mask[b, sl] = 1

    out: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if images:
        h_max = max(h for h, _ in sizes)
        w_max = max(w for _, w in sizes)
        pixel_values = np.zeros((len(images), 3, h_max, w_max), dtype=np.float32)
        for i, img in enumerate(images):
            pixel_values[i, :, : img.shape[1], : img.shape[2]] = img
        out["pixel_values"] = pixel_values
        out["image_sizes"] = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    return out


# ---------------------------------------------------------------------------
# Running the reference
# ---------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """``clamp(cumsum(mask) - 1, min=0)``: generation-style positions for left padding."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def _torch_inputs(inputs: dict) -> dict[str, torch.Tensor]:
    out = {
        "input_ids": torch.as_tensor(np.asarray(inputs["input_ids"], dtype=np.int64)),
        "attention_mask": torch.as_tensor(np.asarray(inputs["attention_mask"], dtype=np.int64)),
    }
    if inputs.get("pixel_values") is not None:
        out["pixel_values"] = torch.as_tensor(np.asarray(inputs["pixel_values"], dtype=np.float32))
        out["image_sizes"] = torch.as_tensor(np.asarray(inputs["image_sizes"], dtype=np.int64))
    return out


def hf_logits(model: LlavaForConditionalGeneration, inputs: dict) -> np.ndarray:
    """Full-sequence logits ``[B, S, V]`` (float32 numpy) of the HF reference.

    Runs one forward pass under ``torch.no_grad`` with ``input_ids``,
    ``attention_mask``, ``pixel_values`` / ``image_sizes`` (when present) and
    ``position_ids = clamp(cumsum(attention_mask) - 1, min=0)`` so left
    padding behaves as in generation.  Logits at padded positions are
    meaningless; compare only where ``attention_mask == 1``.
    """
    t = _torch_inputs(inputs)
    t["position_ids"] = torch.as_tensor(position_ids_from_mask(inputs["attention_mask"]))
    with torch.no_grad():
        out = model(**t, use_cache=False)
    return out.logits.detach().to(torch.float32).cpu().numpy()


def hf_greedy(model: LlavaForConditionalGeneration, inputs: dict, max_new_tokens: int = 32, *, suppress_eos: bool = False) -> np.ndarray:
    """Greedy continuation: new token ids ``[B, max_new_tokens]`` (int64 numpy).

    Calls ``model.generate(do_sample=False, max_new_tokens=n,
    min_new_tokens=n, pad_token_id=PAD_ID)`` (KV-cached decoding, pixel inputs
    used in the prefill only), so exactly ``n`` tokens come back for every row
    and EOS never stops a row.  generate derives positions from the attention
    mask (``cumsum - 1``, pads at 0), the same as :func:`hf_logits`.

    EOS handling: in transformers ``min_new_tokens`` works by setting the EOS
    logit to ``-inf`` until ``n`` tokens exist, which would make the result
    "argmax excluding EOS".  By default (``suppress_eos=False``) this function
    also passes ``eos_token_id=None``, which disables both stopping and that
    masking, so every token is the plain argmax over the full vocabulary (EOS,
    id 2, may appear and decoding simply continues) -- what a fixed-length
    greedy loop computes.  ``suppress_eos=True`` keeps the model's EOS so
    transformers masks it (never emitted).
    """
    t = _torch_inputs(inputs)
    prompt_len = t["input_ids"].shape[1]
    extra: dict[str, Any] = {} if suppress_eos else {"eos_token_id": None}
    with torch.no_grad():
        out = model.generate(
            **t,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=PAD_ID,
            **extra,
        )
    new = out[:, prompt_len:].cpu().numpy().astype(np.int64)
    if new.shape != (t["input_ids"].shape[0], max_new_tokens):
        raise AssertionError(f"generate returned {tuple(new.shape)} new tokens")
    return new
