"""Flax NNX model: Pixtral vision encoder, projector, Mistral-NeMo style decoder."""

from apriel_jax.model.apriel import AprielModel, Projector
from apriel_jax.model.config import decoder_config, model_config, projector_config, vision_config
from apriel_jax.model.decoder import KVCache
from apriel_jax.model.factory import abstract_model, create_model, model_from_state, param_count, state_shardings
from apriel_jax.model.presets import PRESETS, get_preset

__all__ = [
    "AprielModel", "Projector", "KVCache", "PRESETS", "get_preset", "abstract_model", "create_model",
    "model_from_state", "param_count", "state_shardings", "model_config", "vision_config", "decoder_config",
    "projector_config",
]
