"""config.json <-> model config, for both transformers 4.x and 5.x spellings."""

import pytest

from apriel_jax.checkpoint.hf_config import ConfigError, from_hf_config, to_hf_config
from apriel_jax.checkpoint.mistral import from_params_json, to_params_json
from apriel_jax.model import get_preset


def v4_style_config():
    """What a transformers 4.x Pixtral/Llava config.json looks like (rope_theta, no vision head_dim)."""
    return {
        "model_type": "llava",
        "image_token_index": 10,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "text_config": {
            "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 14336,
            "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "rope_theta": 1000000000.0, "rms_norm_eps": 1e-05, "sliding_window": None,
            "max_position_embeddings": 1024000,
        },
        "vision_config": {
            "model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 1024, "patch_size": 16, "rope_theta": 10000.0,
            "hidden_act": "gelu",
        },
    }


def test_transformers_4x_pixtral_config():
    cfg = from_hf_config(v4_style_config())
    assert cfg.decoder.rope_theta == 1e9 and cfg.vision.rope_theta == 1e4
    assert cfg.vision.head_dim == 64 and cfg.decoder.head_dim == 128
    assert cfg.vision.hidden_act == "gelu"  # as the (Unsloth-derived) config says, not assumed
    assert cfg.projector.bias is True  # LlavaConfig default when absent
    assert cfg.decoder.sliding_window == 0
    reference = get_preset("pixtral_12b")
    for section in ("decoder",):
        for key, value in reference[section].items():
            assert cfg[section][key] == value, key


def test_transformers_5x_spellings():
    hf = v4_style_config()
    hf["image_token_id"] = hf.pop("image_token_index")
    hf["multimodal_projector_bias"] = False
    text, vision = hf["text_config"], hf["vision_config"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": vision.pop("rope_theta")}
    cfg = from_hf_config(hf)
    assert cfg.decoder.rope_theta == 1e9 and cfg.vision.rope_theta == 1e4
    assert cfg.image_token_id == 10 and cfg.projector.bias is False


def test_round_trip_through_hf_and_mistral_configs():
    for preset in ("tiny", "apriel_15b"):
        cfg = get_preset(preset)
        back = from_hf_config(to_hf_config(cfg))
        for section in ("vision", "projector", "decoder"):
            assert back[section].to_dict() == cfg[section].to_dict(), (preset, section)
        mistral = from_params_json(to_params_json(cfg))
        assert mistral.decoder.num_layers == cfg.decoder.num_layers
        assert mistral.vision.to_dict() | {"hidden_act": "silu"} == cfg.vision.to_dict() | {"hidden_act": "silu"}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["text_config"].update(rope_scaling={"rope_type": "linear", "factor": 2.0}), "linear"),
        (lambda c: c.update(vision_feature_select_strategy="default"), "CLS"),
        (lambda c: c.update(vision_feature_layer=[-1, -2]), "list"),
        (lambda c: c["vision_config"].update(model_type="siglip_vision_model"), "pixtral"),
        (lambda c: c["text_config"].pop("hidden_size"), "hidden_size"),
        (lambda c: c["text_config"].update(num_key_value_heads=3), "num_kv_heads"),
    ],
)
def test_unsupported_or_broken_configs(edit, message):
    hf = v4_style_config()
    edit(hf)
    with pytest.raises(ConfigError, match=message):
        from_hf_config(hf)
