"""Building blocks shared by both towers: parameters with logical axes, RMSNorm, linear maps, gated MLP.

Every parameter names its logical axes (``embed``, ``mlp``, ``heads``, ...); ``parallel/rules.py``
maps those names onto mesh axes. Parameters are stored in ``param_dtype`` and cast to the compute
``dtype`` where they are used, so fp32 master weights and bf16 compute need no second copy.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_INIT_STD = 0.02  # HF `initializer_range`


def logical_param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """A parameter annotated with logical axis names.

    Eager sharding is off: the variable only records its axes; sharding is applied by jit
    ``out_shardings`` when the model is created on a mesh (``apriel_jax.model.create_model``), so the
    same module code builds abstract, single-device and sharded models.
    """
    if value.ndim != len(axes):
        raise ValueError(f"parameter of shape {value.shape} given {len(axes)} logical axes {tuple(axes)}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def normal_init(rngs: nnx.Rngs, shape, dtype, std: float = DEFAULT_INIT_STD) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, dtype)


def activation(name: str):
    """Activation by its HF config name (``hidden_act``)."""
    if name == "silu":
        return jax.nn.silu
    if name == "gelu":  # HF "gelu" is the exact erf form
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"unsupported activation {name!r}")


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to the input dtype, then scaled (as HF does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = logical_param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); the kernel may have several output axes, e.g. [embed, heads, head_dim].

    ``in_axes`` is how many leading kernel axes contract with the trailing axes of x.
    """

    def __init__(
        self,
        shape: Sequence[int],
        axes: Sequence[str],
        *,
        rngs: nnx.Rngs,
        in_axes: int = 1,
        use_bias: bool = False,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        self.in_axes = in_axes
        self.dtype = dtype
        self.kernel = logical_param(normal_init(rngs, tuple(shape), param_dtype), axes)
        self.bias = (
            logical_param(jnp.zeros(tuple(shape[in_axes:]), param_dtype), tuple(axes[in_axes:]))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.in_axes
        kernel = self.kernel[...].astype(self.dtype)
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)) without biases, as in Mistral and Pixtral."""

    def __init__(self, hidden: int, intermediate: int, act: str, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.gate = Linear((hidden, intermediate), ("embed", "mlp"), **kw)
        self.up = Linear((hidden, intermediate), ("embed", "mlp"), **kw)
        self.down = Linear((intermediate, hidden), ("mlp", "embed"), **kw)
        self.act_name = act
        activation(act)  # fail at construction, not at the first call

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(activation(self.act_name)(self.gate(x)) * self.up(x))


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
