"""Bad checkpoints fail with a clear error that names the tensor, and never leave half-written output."""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import apriel_jax
import hf_reference as ref
from apriel_jax.checkpoint import hf_export, orbax_io, pretrained
from apriel_jax.checkpoint.hf_config import ConfigError
from apriel_jax.checkpoint.safetensors_io import CheckpointError
from apriel_jax.model import create_model, get_preset

EMBED = "language_model.model.embed_tokens.weight"
Q0 = "language_model.model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    model = ref.make_hf_model(ref.make_hf_config(**ref.TINY_VARIANTS["base"]), seed=1)
    return ref.save_hf_model(model, tmp_path_factory.mktemp("good"))


def edited_copy(good, tmp_path, edit_tensors=None, edit_config=None):
    """A copy of the good checkpoint with its tensors and/or config edited."""
    out = tmp_path / "edited"
    shutil.copytree(good, out)
    if edit_tensors:
        tensors = safetensors.numpy.load_file(out / "model.safetensors")
        edit_tensors(tensors)
        safetensors.numpy.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_missing_tensor_is_named(good, tmp_path):
    path = edited_copy(good, tmp_path, lambda t: t.pop(Q0))
    with pytest.raises(CheckpointError, match="missing.*" + Q0.replace(".", r"\.")):
        apriel_jax.from_pretrained(path)


def test_unexpected_tensor_is_named(good, tmp_path):
    path = edited_copy(good, tmp_path, lambda t: t.__setitem__("language_model.model.extra.weight",
                                                              np.ones((3,), np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected.*language_model\.model\.extra\.weight"):
        apriel_jax.from_pretrained(path)


def test_wrong_shape_is_named(good, tmp_path):
    path = edited_copy(good, tmp_path, lambda t: t.__setitem__(Q0, t[Q0][:-1]))
    with pytest.raises(CheckpointError, match=Q0.replace(".", r"\.") + ".*shape"):
        apriel_jax.from_pretrained(path)


def test_wrong_dtype_is_named(good, tmp_path):
    path = edited_copy(good, tmp_path, lambda t: t.__setitem__(EMBED, t[EMBED].astype(np.int32)))
    with pytest.raises(CheckpointError, match=EMBED.replace(".", r"\.") + ".*int32"):
        apriel_jax.from_pretrained(path)


def test_config_that_disagrees_with_weights(good, tmp_path):
    def more_layers(cfg):
        cfg["text_config"]["num_hidden_layers"] = 3

    with pytest.raises(CheckpointError, match="(?s)missing.*layers\\.2.*3 decoder"):
        apriel_jax.from_pretrained(edited_copy(good, tmp_path, edit_config=more_layers))

    def wider(cfg):
        cfg["text_config"]["intermediate_size"] = 96

    shutil.rmtree(tmp_path / "edited")
    with pytest.raises(CheckpointError, match="(?s)mlp.*shape.*config"):
        apriel_jax.from_pretrained(edited_copy(good, tmp_path, edit_config=wider))


def test_unsupported_config_settings_are_rejected(good, tmp_path):
    def scaled_rope(cfg):
        cfg["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}

    with pytest.raises(ConfigError, match="yarn"):
        apriel_jax.from_pretrained(edited_copy(good, tmp_path, edit_config=scaled_rope))
    (tmp_path / "edited" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        apriel_jax.from_pretrained(tmp_path / "edited")


def test_truncated_safetensors_fails_at_open(good, tmp_path):
    path = edited_copy(good, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        apriel_jax.from_pretrained(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="not a checkpoint"):
        apriel_jax.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        apriel_jax.from_pretrained(tmp_path / "absent")


def test_failed_export_leaves_no_directory(tmp_path, monkeypatch):
    cfg = get_preset("tiny")
    state = nnx.state(create_model(cfg))
    real_specs = hf_export.tensor_specs

    def failing_specs(*args, **kwargs):
        specs = real_specs(*args, **kwargs)
        bad = specs[len(specs) // 2]

        def boom():
            raise RuntimeError("disk on fire")

        specs[len(specs) // 2] = bad._replace(produce=boom)
        return specs

    monkeypatch.setattr(hf_export, "tensor_specs", failing_specs)
    with pytest.raises(RuntimeError, match="disk on fire"):
        hf_export.export_hf(state, cfg, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite(tmp_path):
    cfg = get_preset("tiny")
    state = nnx.state(create_model(cfg))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        hf_export.export_hf(state, cfg, tmp_path / "out")
    with pytest.raises(FileExistsError):
        orbax_io.save_model(state, cfg, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_interrupted_orbax_save_is_not_a_checkpoint(tmp_path, monkeypatch):
    cfg = get_preset("tiny")
    state = nnx.state(create_model(cfg))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_io.ocp.Checkpointer, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        orbax_io.save_model(state, cfg, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises((ConfigError, FileNotFoundError)):
        pretrained.from_pretrained(tmp_path / "ckpt")
