"""Counting a compiled program's collectives per step (apriel_jax.parallel.collectives): loop trip counts
multiplied in, whole-tensor bytes, every printed form of replica groups. The real TPU step is checked in
tests/test_aot_tpu.py; here XLA:CPU's SPMD partitioner makes the collectives of small programs."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from apriel_jax.parallel.collectives import collectives_per_step
from apriel_jax.parallel.mesh import make_mesh


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"fsdp": 4, "tensor": 2})


def test_gather_inside_a_scan_counts_once_per_iteration_and_nested_loops_multiply(mesh):
    def body(x, w):
        w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P(None, None)))  # gathered per iteration
        return jnp.tanh(x @ w), None

    def inner(x, ws):
        return jax.lax.scan(body, x, ws)[0]

    def outer(x, ws):  # 5 outer iterations of a 3-step scan: 15 gathers of one [64, 64] fp32 weight
        return jax.lax.fori_loop(0, 5, lambda i, y: inner(y, ws), x)

    ws = jax.ShapeDtypeStruct((3, 64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", None)))
    x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, None)))
    text = jax.jit(outer).lower(x, ws).compile().as_text()
    report = collectives_per_step(text)
    gathers = [op for op in report.ops if op.kind == "all-gather" and op.shape[-2:] == (64, 64)]
    assert gathers, text[:2000]
    assert sum(op.per_step for op in gathers) == 15
    assert all(op.bytes == 64 * 64 * 4 for op in gathers)
    totals = report.totals()
    assert totals["all-gather"]["gb"] == pytest.approx(15 * 64 * 64 * 4 / 1e9, rel=0.05)
    assert not report.unknown_loops


def test_reduce_scatter_bytes_are_the_whole_operand(mesh):
    def grad_sum(x, y):
        g = jnp.einsum("be,bv->ev", x, y)  # rows are split over fsdp: a partial sum per device
        return jax.lax.with_sharding_constraint(g, NamedSharding(mesh, P("fsdp", "tensor")))

    rows = NamedSharding(mesh, P("fsdp", None))
    x = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=rows)
    y = jax.ShapeDtypeStruct((16, 128), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", "tensor")))
    report = collectives_per_step(jax.jit(grad_sum).lower(x, y).compile().as_text())
    reductions = [op for op in report.ops if op.kind in ("reduce-scatter", "all-reduce")]
    assert reductions
    # Whichever op XLA:CPU picks, the tensor reduced is the whole [32, 128 / tensor] partial sum.
    assert sum(op.bytes * op.per_step for op in reductions) == 32 * 64 * 4


HANDWRITTEN = """\
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: bf16[64,16]) -> bf16[16,16] {
  %input.1 = bf16[64,16]{1,0} parameter(0)
  %all-reduce.1 = bf16[64,16]{1,0} all-reduce(%input.1), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = bf16[16,16]{1,0} dynamic-slice(%all-reduce.1, %c, %c), dynamic_slice_sizes={16,16}
}

%cond (p: (s32[], f32[8,8])) -> pred[] {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p.1 = (s32[], f32[8,8]) parameter(0)
  %x = f32[8,8] get-tuple-element(%p.1), index=1
  %ag = (f32[2,8], f32[8,8]) all-gather-start(%x), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = f32[8,8] all-gather-done(%ag)
  %rs = f32[2,8] reduce-scatter(%agd), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, to_apply=%add
  %cp = f32[8,8] collective-permute(%agd), source_target_pairs={{0,1},{1,0}}
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %t = (s32[], f32[8,8]) tuple(%i.1, %cp)
}

ENTRY %main (x: f32[8,8], g: bf16[64,16]) -> f32[8,8] {
  %x = f32[8,8] parameter(0)
  %g = bf16[64,16] parameter(1)
  %f = bf16[16,16]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %w = (s32[], f32[8,8]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8,8] get-tuple-element(%w), index=1
}
"""


def test_handwritten_module_covers_async_pairs_fused_reduce_scatters_and_group_forms():
    totals = collectives_per_step(HANDWRITTEN).totals()
    # all-gather-start inside a 7-trip loop: once per trip, the gathered [8, 8] fp32 (done not counted).
    assert totals["all-gather"] == {"ops": 7, "gb": pytest.approx(7 * 256 / 1e9)}
    # One fused all-reduce-scatter of bf16[64, 16] outside the loop and 7 native reduce-scatters whose
    # result is one of 4 shards: the whole operand is [8, 8] fp32.
    assert totals["reduce-scatter"] == {"ops": 8, "gb": pytest.approx((64 * 16 * 2 + 7 * 256) / 1e9)}
    assert totals["collective-permute"] == {"ops": 7, "gb": pytest.approx(7 * 256 / 1e9)}
    assert totals["all-reduce"]["ops"] == 0
