"""Mistral's consolidated format: ``consolidated.safetensors`` + ``params.json``.

Pixtral-12B-2409 was released this way. Tensor names and the interleaved-RoPE q/k permutation live
in ``keymap.py`` (layout ``mistral``); this module maps ``params.json`` to our config and back.
"""

from __future__ import annotations

import json
from typing import Any

from apriel_jax import storage
from apriel_jax.checkpoint.hf_config import ConfigError, _checked
from apriel_jax.model.config import decoder_config, model_config, projector_config, vision_config


def from_params_json(params: dict[str, Any]):
    """Our model ConfigDict from a parsed Mistral ``params.json``."""
    try:
        vis = params["vision_encoder"]
    except KeyError:
        raise ConfigError("params.json has no 'vision_encoder' section: a text-only Mistral model is not a "
                          "Pixtral/Llava checkpoint") from None
    try:
        return _checked(
            model_config(
                vision=vision_config(
                    hidden_size=vis["hidden_size"],
                    intermediate_size=vis["intermediate_size"],
                    num_layers=vis["num_hidden_layers"],
                    num_heads=vis["num_attention_heads"],
                    head_dim=vis.get("head_dim") or vis["hidden_size"] // vis["num_attention_heads"],
                    num_channels=vis.get("num_channels", 3),
                    patch_size=vis.get("patch_size", 16),
                    image_size=vis.get("image_size", 1024),
                    rope_theta=float(vis.get("rope_theta", 10_000.0)),
                    hidden_act=vis.get("hidden_act", "silu"),  # mistral-inference's vision MLP is SiLU
                ),
                projector=projector_config(bias=bool(vis.get("adapter_bias", True)), hidden_act="gelu"),
                decoder=decoder_config(
                    vocab_size=params["vocab_size"],
                    hidden_size=params["dim"],
                    intermediate_size=params["hidden_dim"],
                    num_layers=params["n_layers"],
                    num_heads=params["n_heads"],
                    num_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                    head_dim=params.get("head_dim") or params["dim"] // params["n_heads"],
                    rope_theta=float(params.get("rope_theta", 1e6)),
                    norm_eps=float(params.get("norm_eps", 1e-5)),
                    tie_embeddings=bool(params.get("tied_embeddings", False)),
                    sliding_window=int(params.get("sliding_window") or 0),
                ),
                image_token_id=int(vis.get("image_token_id", 10)),
            )
        )
    except KeyError as e:
        raise ConfigError(f"params.json is missing the field {e.args[0]!r}") from None


def to_params_json(cfg, *, break_id: int = 12, end_id: int = 13) -> dict[str, Any]:
    v, d = cfg.vision, cfg.decoder
    params = {
        "dim": d.hidden_size,
        "n_layers": d.num_layers,
        "head_dim": d.head_dim,
        "hidden_dim": d.intermediate_size,
        "n_heads": d.num_heads,
        "n_kv_heads": d.num_kv_heads,
        "rope_theta": d.rope_theta,
        "norm_eps": d.norm_eps,
        "vocab_size": d.vocab_size,
        "vision_encoder": {
            "hidden_size": v.hidden_size,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "rope_theta": v.rope_theta,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "image_token_id": cfg.image_token_id,
            "image_break_token_id": break_id,
            "image_end_token_id": end_id,
            "adapter_bias": bool(cfg.projector.bias),
        },
    }
    if d.tie_embeddings:
        params["tied_embeddings"] = True
    if d.sliding_window:
        params["sliding_window"] = d.sliding_window
    return params


def read_params_json(directory) -> dict[str, Any]:
    path = storage.location(directory) / "params.json"
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ConfigError(f"{directory}: no params.json (not a Mistral consolidated checkpoint)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
