"""Mistral's consolidated checkpoint layout (``mistralai/Pixtral-12B-2409`` on the hub) of a tiny HF
reference model (``tests/hf_reference.py``), re-derived from the HF tensors on its own.

A plain support module (not a test file). Like ``hf_reference`` it imports nothing from ``apriel_jax``, so
the Mistral-format import is checked against a layout written independently of the code under test.

Typical use::

    import mistral_reference as mref

    mref.write_mistral_consolidated(hf_model, tmp_path / "mistral")   # consolidated.safetensors + params.json
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from hf_reference import IMAGE_BREAK_ID, IMAGE_END_ID

__all__ = [
    "hf_to_mistral_rope_rows",
    "mistral_consolidated_state_dict",
    "mistral_params",
    "write_mistral_consolidated",
]


def hf_to_mistral_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's rotate-half permutation of a q/k projection weight ``[n*hd, in]``.

    HF's converter moved Mistral's (interleaved-pair) row ``2p + s`` of each
    head (``s`` in {0, 1}, ``p < hd/2``) to row ``s * hd/2 + p``.  This maps
    each head's HF row ``s * hd/2 + p`` back to ``2p + s``.
    """
    rows, cols = weight.shape
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    # HF layout: [head, s, p, in]  ->  Mistral layout: [head, p, s, in]
    return weight.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def mistral_consolidated_state_dict(hf_model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The HF model's weights under Mistral's consolidated (Pixtral-12B-2409) names.

    Built from the live HF modules, independent of ``apriel_jax``:

    * text: ``tok_embeddings.weight``, ``norm.weight``, ``output.weight``,
      ``layers.{i}.attention.{wq,wk,wv,wo}.weight``,
      ``layers.{i}.feed_forward.{w1,w2,w3}.weight`` (gate, down, up),
      ``layers.{i}.{attention_norm,ffn_norm}.weight``;
    * vision: ``vision_encoder.patch_conv.weight``, ``vision_encoder.ln_pre.weight``,
      ``vision_encoder.transformer.layers.{i}.attention.{wq,wk,wv,wo}.weight``,
      ``vision_encoder.transformer.layers.{i}.{attention_norm,ffn_norm}.weight``,
      ``vision_encoder.transformer.layers.{i}.feed_forward.{w1,w2,w3}.weight``;
    * adapter: ``vision_language_adapter.{w_in,w_out}.weight`` (+ ``.bias`` when
      the projector has biases).

    ``wq`` / ``wk`` are converted back to Mistral's interleaved rope layout
    with :func:`hf_to_mistral_rope_rows` (text: n = heads / kv heads; vision:
    n = vision heads).  With tied embeddings ``output.weight`` is omitted, as
    Mistral checkpoints do.  Tensors are contiguous float32 copies.
    """
    cfg = hf_model.config
    tcfg, vcfg = cfg.text_config, cfg.vision_config
    llava = hf_model.model
    lm, vt, proj = llava.language_model, llava.vision_tower, llava.multi_modal_projector

    def c(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(torch.float32).cpu().clone().contiguous()

    sd: dict[str, torch.Tensor] = {}
    sd["tok_embeddings.weight"] = c(lm.embed_tokens.weight)
    sd["norm.weight"] = c(lm.norm.weight)
    if not cfg.tie_word_embeddings:
        sd["output.weight"] = c(hf_model.lm_head.weight)
    for i, layer in enumerate(lm.layers):
        p = f"layers.{i}."
        att, mlp = layer.self_attn, layer.mlp
        sd[p + "attention.wq.weight"] = hf_to_mistral_rope_rows(c(att.q_proj.weight), tcfg.num_attention_heads)
        sd[p + "attention.wk.weight"] = hf_to_mistral_rope_rows(c(att.k_proj.weight), tcfg.num_key_value_heads)
        sd[p + "attention.wv.weight"] = c(att.v_proj.weight)
        sd[p + "attention.wo.weight"] = c(att.o_proj.weight)
        sd[p + "feed_forward.w1.weight"] = c(mlp.gate_proj.weight)
        sd[p + "feed_forward.w2.weight"] = c(mlp.down_proj.weight)
        sd[p + "feed_forward.w3.weight"] = c(mlp.up_proj.weight)
        sd[p + "attention_norm.weight"] = c(layer.input_layernorm.weight)
        sd[p + "ffn_norm.weight"] = c(layer.post_attention_layernorm.weight)

    sd["vision_encoder.patch_conv.weight"] = c(vt.patch_conv.weight)
    sd["vision_encoder.ln_pre.weight"] = c(vt.ln_pre.weight)
    for i, layer in enumerate(vt.transformer.layers):
        p = f"vision_encoder.transformer.layers.{i}."
        att, mlp = layer.attention, layer.feed_forward
        sd[p + "attention.wq.weight"] = hf_to_mistral_rope_rows(c(att.q_proj.weight), vcfg.num_attention_heads)
        sd[p + "attention.wk.weight"] = hf_to_mistral_rope_rows(c(att.k_proj.weight), vcfg.num_attention_heads)
        sd[p + "attention.wv.weight"] = c(att.v_proj.weight)
        sd[p + "attention.wo.weight"] = c(att.o_proj.weight)
        sd[p + "attention_norm.weight"] = c(layer.attention_norm.weight)
        sd[p + "ffn_norm.weight"] = c(layer.ffn_norm.weight)
        sd[p + "feed_forward.w1.weight"] = c(mlp.gate_proj.weight)
        sd[p + "feed_forward.w2.weight"] = c(mlp.down_proj.weight)
        sd[p + "feed_forward.w3.weight"] = c(mlp.up_proj.weight)

    for ours, theirs in (("w_in", proj.linear_1), ("w_out", proj.linear_2)):
        sd[f"vision_language_adapter.{ours}.weight"] = c(theirs.weight)
        if theirs.bias is not None:
            sd[f"vision_language_adapter.{ours}.bias"] = c(theirs.bias)
    return sd


def mistral_params(hf_model: LlavaForConditionalGeneration) -> dict:
    """``params.json`` contents for :func:`write_mistral_consolidated`.

    Top level (text): ``dim``, ``n_layers``, ``head_dim``, ``hidden_dim``,
    ``n_heads``, ``n_kv_heads``, ``rope_theta``, ``norm_eps``,
    ``vocab_size`` (+ ``tied_embeddings`` only when embeddings are tied).
    ``vision_encoder``: ``hidden_size``, ``num_channels``, ``image_size``,
    ``patch_size``, ``rope_theta``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``image_token_id``,
    ``image_break_token_id``, ``image_end_token_id``, ``adapter_bias``.
    The Mistral format has no activation fields (vision MLP is SiLU, adapter
    GELU); a non-SiLU vision MLP is recorded as the non-standard
    ``vision_encoder.hidden_act`` and a non-GELU adapter as
    ``vision_encoder.adapter_act``.
    """
    cfg = hf_model.config
    t, v = cfg.text_config, cfg.vision_config
    params: dict[str, Any] = {
        "dim": int(t.hidden_size),
        "n_layers": int(t.num_hidden_layers),
        "head_dim": int(t.head_dim),
        "hidden_dim": int(t.intermediate_size),
        "n_heads": int(t.num_attention_heads),
        "n_kv_heads": int(t.num_key_value_heads),
        "rope_theta": float(t.rope_parameters["rope_theta"]),
        "norm_eps": float(t.rms_norm_eps),
        "vocab_size": int(t.vocab_size),
    }
    if cfg.tie_word_embeddings:
        params["tied_embeddings"] = True
    vision: dict[str, Any] = {
        "hidden_size": int(v.hidden_size),
        "num_channels": int(v.num_channels),
        "image_size": int(v.image_size),
        "patch_size": int(v.patch_size),
        "rope_theta": float(v.rope_parameters["rope_theta"]),
        "intermediate_size": int(v.intermediate_size),
        "num_hidden_layers": int(v.num_hidden_layers),
        "num_attention_heads": int(v.num_attention_heads),
        "image_token_id": int(cfg.image_token_index),
        "image_break_token_id": IMAGE_BREAK_ID,
        "image_end_token_id": IMAGE_END_ID,
        "adapter_bias": bool(cfg.multimodal_projector_bias),
    }
    if v.hidden_act != "silu":
        vision["hidden_act"] = v.hidden_act
    if cfg.projector_hidden_act != "gelu":
        vision["adapter_act"] = cfg.projector_hidden_act
    params["vision_encoder"] = vision
    return params


def write_mistral_consolidated(hf_model: LlavaForConditionalGeneration, out_dir: str | os.PathLike) -> str:
    """Write ``hf_model``'s weights in Mistral's consolidated format; return ``out_dir``.

    Produces ``out_dir/consolidated.safetensors`` (names and rope layout of
    :func:`mistral_consolidated_state_dict`, saved with
    ``safetensors.torch.save_file``) and ``out_dir/params.json``
    (:func:`mistral_params`), like ``mistralai/Pixtral-12B-2409`` on the hub.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(mistral_consolidated_state_dict(hf_model), os.path.join(out_dir, "consolidated.safetensors"))
    with open(os.path.join(out_dir, "params.json"), "w", encoding="utf-8") as f:
        json.dump(mistral_params(hf_model), f, indent=2)
        f.write("\n")
    return out_dir

