"""Run checkpoints: retention policy, data state, restore onto another mesh, half-written saves."""

import jax
import numpy as np
import pytest
from flax import nnx

from apriel_jax.model import create_model, get_preset, state_shardings
from apriel_jax.parallel.mesh import make_mesh
from apriel_jax.train.checkpointing import RunCheckpointer, abstract_like


def small_state(step):
    rng = np.random.default_rng(step)
    return {"w": jax.numpy.asarray(rng.normal(size=(8, 4)), jax.numpy.float32),
            "step": jax.numpy.asarray(step, jax.numpy.int32)}


def test_keeps_last_k_and_every_m(tmp_path):
    with RunCheckpointer(tmp_path, save_every=2, keep_last=2, keep_every=6) as ckpt:
        for step in range(1, 21):
            ckpt.save(step, small_state(step), data_state={"position": step})
        ckpt.wait()
        # Saved on the cadence (multiples of 2); kept: the last two and every 6th.
        assert ckpt.all_steps() == [6, 12, 18, 20]
        state, data, _ = ckpt.restore(abstract_like(small_state(0)))
        assert int(state["step"]) == 20 and data == {"position": 20}
        state, data, _ = ckpt.restore(abstract_like(small_state(0)), step=12)
        np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(small_state(12)["w"]))


def test_invalid_retention_settings(tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        RunCheckpointer(tmp_path, save_every=4, keep_every=6)
    with pytest.raises(ValueError):
        RunCheckpointer(tmp_path, save_every=0)


def test_half_written_checkpoint_is_never_valid(tmp_path):
    with RunCheckpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, small_state(1), meta={"loss": 1.5})
    # A save that died mid-write leaves orbax's temporary directory behind.
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()
    (tmp_path / "2.orbax-checkpoint-tmp-123" / "state").mkdir()
    with RunCheckpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.latest_step() == 1
        _, _, meta = ckpt.restore(abstract_like(small_state(0)))
        assert meta == {"loss": 1.5}
    with RunCheckpointer(tmp_path / "empty", save_every=1) as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore(abstract_like(small_state(0)))


def test_restore_onto_a_different_mesh(tmp_path):
    cfg = get_preset("tiny")
    cfg.decoder.num_kv_heads = 4  # so tensor=4 divides the kv heads
    saved = nnx.state(create_model(cfg, seed=2, mesh=make_mesh({"fsdp": 8})))
    with RunCheckpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, saved)
    target_mesh = make_mesh({"fsdp": 2, "tensor": 4})
    target = abstract_like(nnx.state(create_model(cfg, seed=0, mesh=target_mesh)), state_shardings(cfg, target_mesh))
    with RunCheckpointer(tmp_path, save_every=1) as ckpt:
        restored, _, _ = ckpt.restore(target)
    q = restored["decoder"]["layers"]["attn"]["q"]["kernel"][...]
    assert q.sharding.mesh.shape["tensor"] == 4
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
