"""Mesh construction: degree inference, clear errors, in-slice x cross-slice (DCN) meshes."""

import pytest

from apriel_jax.parallel.mesh import make_mesh, resolve_degrees


def test_degrees_are_inferred_and_checked():
    assert resolve_degrees({"fsdp": -1, "tensor": 2}, 8) == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
    with pytest.raises(ValueError, match="multiply to 6"):
        resolve_degrees({"fsdp": 3, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        resolve_degrees({"fsdp": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="at most one"):
        resolve_degrees({"fsdp": -1, "tensor": -1}, 8)


def test_cpu_mesh_and_a_cross_slice_request_without_slices():
    mesh = make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    with pytest.raises(ValueError, match="span 1 slice"):
        make_mesh({"fsdp": -1}, dcn_degrees={"data": 2})


def test_multi_slice_mesh_puts_the_dcn_axis_across_slices():
    pytest.importorskip("libtpu")
    from apriel_jax.parallel.aot import topology_devices, topology_mesh

    devices = topology_devices("v5e:2x2", num_slices=2)
    mesh = make_mesh({"fsdp": 4}, devices, {"data": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    for index in range(2):  # each data index is one whole slice
        assert {d.slice_index for d in mesh.devices[index].flat} == {index}
    assert dict(topology_mesh("v5e:2x2", {"fsdp": 4}, num_slices=2).shape)["data"] == 2


def test_multi_slice_train_step_compiles():
    pytest.importorskip("libtpu")
    from apriel_jax.model import get_preset
    from apriel_jax.train.aot import compile_train_step
    from apriel_jax.train.optimizer import make_optimizer

    result, _ = compile_train_step(get_preset("tiny"), make_optimizer(1e-3), "v5e:2x2", {"fsdp": 4},
                                   batch=8, seq=64, patches=16, num_slices=2)
    assert result.chips == 8 and result.fits()
