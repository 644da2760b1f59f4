"""Hugging Face ``config.json`` (LlavaConfig: Pixtral vision + Mistral text) <-> our model ConfigDict.

Reads both the transformers 4.x spelling (``rope_theta``, ``image_token_index``) and the 5.x one
(``rope_parameters``, ``image_token_id``). Settings our model does not implement (RoPE scaling, a
feature-selection strategy that drops a CLS token) are rejected with a clear error instead of being
silently ignored.
"""

from __future__ import annotations

from typing import Any

from apriel_jax.model.config import decoder_config, model_config, projector_config, validate, vision_config


class ConfigError(ValueError):
    """A config.json that cannot describe (or disagrees with) the model."""


def _rope_theta(section: dict, where: str, default: float) -> float:
    params = section.get("rope_parameters") or section.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "axial", None):
        raise ConfigError(f"{where}: rope_type {rope_type!r} (RoPE scaling) is not supported")
    theta = params.get("rope_theta", section.get("rope_theta", default))
    return float(theta)


def _head_dim(section: dict) -> int:
    head_dim = section.get("head_dim")
    return int(head_dim) if head_dim else section["hidden_size"] // section["num_attention_heads"]


def from_hf_config(hf: dict[str, Any]):
    """Our model ConfigDict from a parsed LlavaForConditionalGeneration config.json."""
    if hf.get("model_type") not in ("llava", "mistral3", None):
        raise ConfigError(f"config.json model_type {hf.get('model_type')!r} is not a Llava model")
    try:
        text, vis = hf["text_config"], hf["vision_config"]
    except KeyError as e:
        raise ConfigError(f"config.json has no {e.args[0]!r} section") from None
    if vis.get("model_type", "pixtral") != "pixtral":
        raise ConfigError(f"vision_config.model_type {vis.get('model_type')!r}: only pixtral is supported")
    strategy = hf.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        raise ConfigError(f"vision_feature_select_strategy {strategy!r}: Pixtral has no CLS token, use 'full'")
    feature_layer = hf.get("vision_feature_layer", -1)
    if not isinstance(feature_layer, int):
        raise ConfigError(f"vision_feature_layer {feature_layer!r}: a list of layers is not supported")
    sliding = text.get("sliding_window")
    try:
        return _checked(
            model_config(
                vision=vision_config(
                    hidden_size=vis["hidden_size"],
                    intermediate_size=vis["intermediate_size"],
                    num_layers=vis["num_hidden_layers"],
                    num_heads=vis["num_attention_heads"],
                    head_dim=_head_dim(vis),
                    num_channels=vis.get("num_channels", 3),
                    patch_size=vis.get("patch_size", 16),
                    image_size=vis.get("image_size", 1024),
                    rope_theta=_rope_theta(vis, "vision_config", 10_000.0),
                    hidden_act=vis.get("hidden_act", "gelu"),
                ),
                projector=projector_config(
                    bias=bool(hf.get("multimodal_projector_bias", True)),
                    hidden_act=hf.get("projector_hidden_act", "gelu"),
                    vision_feature_layer=feature_layer,
                ),
                decoder=decoder_config(
                    vocab_size=text["vocab_size"],
                    hidden_size=text["hidden_size"],
                    intermediate_size=text["intermediate_size"],
                    num_layers=text["num_hidden_layers"],
                    num_heads=text["num_attention_heads"],
                    num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
                    head_dim=_head_dim(text),
                    rope_theta=_rope_theta(text, "text_config", 10_000.0),
                    norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                    hidden_act=text.get("hidden_act", "silu"),
                    tie_embeddings=bool(text.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))),
                    max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
                    sliding_window=int(sliding) if sliding else 0,
                ),
                image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 10))),
            )
        )
    except KeyError as e:
        raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None


def _checked(cfg):
    try:
        validate(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def to_hf_config(cfg, *, dtype: str = "float32", token_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """A config.json dict that transformers loads as LlavaForConditionalGeneration.

    RoPE theta is written in both spellings so transformers 4.x and 5.x read the same value.
    """
    v, d, p = cfg.vision, cfg.decoder, cfg.projector
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11, **(token_ids or {})}
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": int(cfg.image_token_id),
        "projector_hidden_act": p.hidden_act,
        "multimodal_projector_bias": bool(p.bias),
        "vision_feature_layer": int(p.vision_feature_layer),
        "vision_feature_select_strategy": "full",
        "image_seq_length": 1,
        "tie_word_embeddings": bool(d.tie_embeddings),
        "torch_dtype": dtype,
        "dtype": dtype,
        "vision_config": {
            "model_type": "pixtral",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "head_dim": v.head_dim,
            "num_channels": v.num_channels,
            "patch_size": v.patch_size,
            "image_size": v.image_size,
            "hidden_act": v.hidden_act,
            "rope_theta": v.rope_theta,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
        "text_config": {
            "model_type": "mistral",
            "vocab_size": d.vocab_size,
            "hidden_size": d.hidden_size,
            "intermediate_size": d.intermediate_size,
            "num_hidden_layers": d.num_layers,
            "num_attention_heads": d.num_heads,
            "num_key_value_heads": d.num_kv_heads,
            "head_dim": d.head_dim,
            "hidden_act": d.hidden_act,
            "rms_norm_eps": d.norm_eps,
            "max_position_embeddings": d.max_position_embeddings,
            "tie_word_embeddings": bool(d.tie_embeddings),
            "sliding_window": d.sliding_window or None,
            "rope_theta": d.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": d.rope_theta},
            **ids,
        },
        **ids,
    }
