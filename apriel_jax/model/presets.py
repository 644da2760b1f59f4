"""Named model presets. Parameter counts of the real ones are checked in tests with ``jax.eval_shape``."""

from __future__ import annotations

import ml_collections

from apriel_jax.model.config import decoder_config, model_config, projector_config, vision_config


def tiny() -> ml_collections.ConfigDict:
    """A few-hundred-thousand-parameter model with every architectural feature of the real one.

    head_dim is decoupled from hidden_size (4 * 32 != 64) and GQA is on (4 query / 2 kv heads), as in
    Mistral-NeMo, so tests exercise the same code paths as the 12B/15B models.
    """
    return model_config(
        vision=vision_config(
            hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, head_dim=16, image_size=256
        ),
        projector=projector_config(bias=True),
        decoder=decoder_config(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            rope_theta=1e6,
            max_position_embeddings=8192,
        ),
    )


def pixtral_12b() -> ml_collections.ConfigDict:
    """Pixtral-12B-2409: 24-layer vision encoder, 40-layer decoder, 12.68B parameters."""
    return model_config()


def apriel_15b() -> ml_collections.ConfigDict:
    """Apriel-1.5-15B-Thinker: Pixtral-12B with the decoder depth-upscaled to 48 layers, 14.86B parameters."""
    cfg = model_config()
    cfg.decoder.num_layers = 48
    cfg.decoder.max_position_embeddings = 131_072
    return cfg


PRESETS = {"tiny": tiny, "pixtral_12b": pixtral_12b, "apriel_15b": apriel_15b}


def get_preset(name: str) -> ml_collections.ConfigDict:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
