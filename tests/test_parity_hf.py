"""The acceptance test: our model against transformers' LlavaForConditionalGeneration (Pixtral + Mistral).

Tiny random HF models (several configs) are saved, imported with apriel-jax and compared on batches with
1-3 images of different sizes: fp32 logits within 1e-5 relative error, greedy generation identical.
Export goes the other way: transformers loads what we write and gives the same logits.
"""

import copy
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

import apriel_jax
import hf_reference as ref
import mistral_reference as mref
from apriel_jax.checkpoint import pretrained
from apriel_jax.data import from_hf_inputs
from apriel_jax.model.generate import SamplingConfig, generate
from apriel_jax.parallel.mesh import make_mesh

REL_TOL = 1e-5
BATCHES = {
    "one_image": [[(32, 48)]],
    "two_rows_three_images": [[(32, 48), (16, 16)], [(48, 32)]],
    "three_images_odd_sizes": [[(16, 32), (48, 16), (16, 16)]],
    "text_only": [[], []],
}


@pytest.fixture(scope="module", params=sorted(ref.TINY_VARIANTS))
def reference(request, tmp_path_factory):
    """(variant name, HF model, saved directory); the 'mha' variant is saved in several shards."""
    name = request.param
    model = ref.make_hf_model(ref.make_hf_config(**ref.TINY_VARIANTS[name]), seed=7)
    shard = "100KB" if name == "mha" else None
    path = ref.save_hf_model(model, tmp_path_factory.mktemp(name), max_shard_size=shard)
    return name, model, path


def our_logits(model, inputs):
    batch = from_hf_inputs(
        inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_sizes"), inputs["attention_mask"],
        image_token_id=model.config.image_token_id,
    )
    return np.asarray(model({k: jnp.asarray(v) for k, v in batch.items()})), batch


def max_relative_error(ours, theirs, mask):
    return float(np.abs(ours - theirs)[mask].max() / np.abs(theirs[mask]).max())


@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_logits_match_transformers(reference, batch_name):
    name, hf_model, path = reference
    inputs = ref.make_inputs(BATCHES[batch_name], vocab_size=hf_model.config.text_config.vocab_size, seed=3)
    theirs = ref.hf_logits(hf_model, inputs)
    ours, _ = our_logits(apriel_jax.from_pretrained(path), inputs)
    real = inputs["attention_mask"].astype(bool)
    err = max_relative_error(ours, theirs, real)
    assert err <= REL_TOL, f"{name}/{batch_name}: max relative logits error {err:.2e}"


@pytest.mark.parametrize("rows", [[[(32, 48), (16, 16)]], [[(16, 32)], [(32, 16), (16, 16)]]])
def test_greedy_generation_matches_transformers(reference, rows):
    name, hf_model, path = reference
    inputs = ref.make_inputs(rows, vocab_size=hf_model.config.text_config.vocab_size, seed=5)
    theirs = ref.hf_greedy(hf_model, inputs, max_new_tokens=32)
    model = apriel_jax.from_pretrained(path)
    _, batch = our_logits(model, inputs)
    ours, _ = generate(model, batch, SamplingConfig(max_new_tokens=32, pad_id=ref.PAD_ID))
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_export_loads_in_transformers_with_identical_weights(reference, tmp_path):
    name, hf_model, path = reference
    pretrained.hf_to_orbax(path, tmp_path / "orbax")
    pretrained.orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", max_shard_bytes=150_000)
    reloaded = ref.load_hf_model(tmp_path / "hf")
    theirs = hf_model.state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=f"{name}: {key}")
    inputs = ref.make_inputs(BATCHES["two_rows_three_images"], vocab_size=hf_model.config.text_config.vocab_size)
    np.testing.assert_array_equal(ref.hf_logits(reloaded, inputs), ref.hf_logits(hf_model, inputs))


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(safetensors.numpy.load_file(f))
    return out


def test_hf_orbax_hf_round_trip_is_bit_exact_in_bfloat16(reference, tmp_path):
    """bf16 weights stay bf16 through orbax and come back byte for byte."""
    _, hf_model, _ = reference
    src = ref.save_hf_model(copy.deepcopy(hf_model).to(torch.bfloat16), tmp_path / "bf16")
    pretrained.hf_to_orbax(src, tmp_path / "orbax")
    pretrained.orbax_to_hf(tmp_path / "orbax", tmp_path / "back")
    from apriel_jax.checkpoint.safetensors_io import SafetensorsCheckpoint

    a, b = SafetensorsCheckpoint(src), SafetensorsCheckpoint(tmp_path / "back")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert a.dtype(key) == b.dtype(key), key
        assert a.get(key).tobytes() == b.get(key).tobytes(), key
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_new_transformers_key_layout_imports_the_same(reference, tmp_path):
    """Checkpoints saved with the in-memory names of transformers >= 4.52 (model.language_model.*)."""
    _, hf_model, path = reference
    renamed = {}
    for key, value in _tensors(Path(path)).items():
        key = key.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        key = key.replace("vision_tower.", "model.vision_tower.").replace("multi_modal_projector.", "model.multi_modal_projector.")
        renamed[key] = value
    (tmp_path / "new").mkdir()
    safetensors.numpy.save_file(renamed, tmp_path / "new" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "new" / "config.json").write_text((Path(path) / "config.json").read_text())
    inputs = ref.make_inputs(BATCHES["one_image"], vocab_size=hf_model.config.text_config.vocab_size)
    a, _ = our_logits(apriel_jax.from_pretrained(path), inputs)
    b, _ = our_logits(apriel_jax.from_pretrained(tmp_path / "new"), inputs)
    np.testing.assert_array_equal(a, b)


def test_mistral_consolidated_import_equals_hf_import(reference, tmp_path):
    name, hf_model, path = reference
    mref.write_mistral_consolidated(hf_model, tmp_path / "mistral")
    inputs = ref.make_inputs(BATCHES["two_rows_three_images"], vocab_size=hf_model.config.text_config.vocab_size)
    from_hf, _ = our_logits(apriel_jax.from_pretrained(path), inputs)
    from_mistral, _ = our_logits(apriel_jax.from_pretrained(tmp_path / "mistral"), inputs)
    np.testing.assert_array_equal(from_mistral, from_hf)
    # And both ways through the converters: mistral -> HF loads in transformers with the same weights.
    pretrained.mistral_to_hf(tmp_path / "mistral", tmp_path / "hf")
    reloaded = ref.load_hf_model(tmp_path / "hf")
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, hf_model.state_dict()[key], rtol=0, atol=0, msg=f"{name}: {key}")
    pretrained.hf_to_mistral(path, tmp_path / "mistral_again")
    original = _tensors(tmp_path / "mistral")
    again = _tensors(tmp_path / "mistral_again")
    assert sorted(original) == sorted(again)
    for key in original:
        np.testing.assert_array_equal(again[key], original[key], err_msg=key)


def test_import_straight_into_shards_matches(reference):
    name, hf_model, path = reference
    kv_heads = hf_model.config.text_config.num_key_value_heads
    mesh = make_mesh({"fsdp": -1, "tensor": min(2, kv_heads)})
    inputs = ref.make_inputs(BATCHES["one_image"], vocab_size=hf_model.config.text_config.vocab_size)
    single, _ = our_logits(apriel_jax.from_pretrained(path), inputs)
    sharded_model = apriel_jax.from_pretrained(path, mesh=mesh)
    spec = sharded_model.decoder.embed[...].sharding.spec
    assert "fsdp" in str(spec) or "tensor" in str(spec)
    sharded, _ = our_logits(sharded_model, inputs)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
