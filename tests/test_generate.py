"""Generation: KV-cache decoding equals full forward passes; sampling rules; stop tokens; padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apriel_jax.model import create_model, get_preset
from apriel_jax.model.generate import SamplingConfig, generate, sample_token


@pytest.fixture(scope="module")
def model():
    return create_model(get_preset("tiny"), seed=11)


def prompt(tokens, pad_left=0, pad_right=0, pad_id=0):
    n = len(tokens)
    ids = [pad_id] * pad_left + list(tokens) + [pad_id] * pad_right
    seg = [0] * pad_left + [1] * n + [0] * pad_right
    pos = [0] * pad_left + list(range(n)) + [0] * pad_right
    return {k: np.asarray([v], np.int32) for k, v in (("tokens", ids), ("segment_ids", seg), ("positions", pos))}


def test_cached_decoding_equals_argmax_of_full_forward(model):
    rng = np.random.default_rng(0)
    tokens = list(rng.integers(20, 1024, 9))
    out, done = generate(model, prompt(tokens), SamplingConfig(max_new_tokens=12))
    out = list(np.asarray(out)[0])
    # Re-run the whole sequence without a cache at each step.
    seq = tokens
    for token in out:
        logits = np.asarray(model(prompt(seq)))[0, -1]
        assert token == int(np.argmax(logits))
        seq = seq + [token]
    assert not bool(done[0])


def test_left_and_right_padding_give_the_same_tokens(model):
    tokens = list(np.random.default_rng(1).integers(20, 1024, 7))
    cfg = SamplingConfig(max_new_tokens=8)
    plain = np.asarray(generate(model, prompt(tokens), cfg)[0])
    left = np.asarray(generate(model, prompt(tokens, pad_left=5), cfg)[0])
    right = np.asarray(generate(model, prompt(tokens, pad_right=4), cfg)[0])
    np.testing.assert_array_equal(left, plain)
    np.testing.assert_array_equal(right, plain)


def test_stop_tokens_end_a_row_and_pad_the_rest(model):
    tokens = list(np.random.default_rng(2).integers(20, 1024, 6))
    free = np.asarray(generate(model, prompt(tokens), SamplingConfig(max_new_tokens=10))[0])[0]
    stop = int(free[3])
    first = int(np.argmax(free == stop))  # the stop token may already appear earlier
    out, done = generate(model, prompt(tokens), SamplingConfig(max_new_tokens=10, stop_tokens=(stop,), pad_id=-1))
    out = np.asarray(out)[0]
    np.testing.assert_array_equal(out[: first + 1], free[: first + 1])
    assert (out[first + 1:] == -1).all()
    assert bool(done[0])


def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 4000)

    def frequencies(cfg):
        samples = np.asarray(jax.vmap(lambda k: sample_token(logits, k, cfg))(keys))[:, 0]
        return np.bincount(samples, minlength=4) / len(samples)

    assert int(sample_token(logits, keys[0], SamplingConfig())[0]) == 0  # greedy
    np.testing.assert_allclose(frequencies(SamplingConfig(temperature=1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p 0.7: tokens 0 and 1 (mass 0.8 reaches 0.7), renormalised to 0.625 / 0.375.
    np.testing.assert_allclose(frequencies(SamplingConfig(temperature=1.0, top_p=0.7)), [0.625, 0.375, 0, 0],
                               atol=0.03)
    # top_k 3 drops the last token.
    np.testing.assert_allclose(frequencies(SamplingConfig(temperature=1.0, top_k=3)),
                               np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.03)
    # Low temperature sharpens towards the argmax.
    assert frequencies(SamplingConfig(temperature=0.1))[0] > 0.98


def test_invalid_sampling_settings():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
