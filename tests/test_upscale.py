"""Depth upscaling: identity-initialised copies leave the model's function unchanged, on sharded params."""

import jax
import numpy as np
import pytest
from flax import nnx

from apriel_jax.model import create_model, get_preset, model_from_state
from apriel_jax.parallel.mesh import make_mesh
from apriel_jax.stages.upscale import default_layer_map, upscale_decoder
from test_model import random_batch


def test_default_layer_map_duplicates_middle_layers_in_place():
    layer_map = default_layer_map(40, 48)
    assert len(layer_map) == 48 and sorted(set(layer_map)) == list(range(40))
    assert [i for i in set(layer_map) if layer_map.count(i) == 2] == list(range(16, 24))
    assert layer_map[16:20] == [16, 16, 17, 17]
    with pytest.raises(ValueError):
        default_layer_map(4, 10)


@pytest.mark.parametrize("sharded", [False, True])
def test_identity_upscaled_model_gives_the_same_logits(sharded):
    cfg = get_preset("tiny")
    mesh = make_mesh({"fsdp": 4, "tensor": 2}) if sharded else None
    model = create_model(cfg, seed=4, mesh=mesh)
    batch = random_batch(cfg, np.random.default_rng(0))
    before = np.asarray(model(batch))

    new_cfg, new_state = upscale_decoder(nnx.state(model), model.config, [0, 1, 1, 0])
    assert new_cfg.decoder.num_layers == 4 and cfg.decoder.num_layers == 2
    q = new_state["decoder"]["layers"]["attn"]["q"]["kernel"][...]
    assert q.shape[0] == 4
    if sharded:
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    after = np.asarray(model_from_state(new_cfg, new_state)(batch))
    np.testing.assert_array_equal(after, before)

    # Without identity init the copies are full layers again: the function changes.
    _, plain = upscale_decoder(nnx.state(model), model.config, [0, 1, 1, 0], identity_init=False)
    assert np.abs(np.asarray(model_from_state(new_cfg, plain)(batch)) - before).max() > 1e-3


def test_bad_layer_map():
    model = create_model(get_preset("tiny"))
    with pytest.raises(ValueError, match="layer_map"):
        upscale_decoder(nnx.state(model), model.config, [0, 2])
