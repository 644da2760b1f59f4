"""LoRA adapters on the decoder's projections (and optionally the projector's two linear maps).

A targeted ``Linear`` keeps its kernel W [*in, *out] and gains A [*in, r] and B [r, *out] (a quantized base,
``model/quant.py``, keeps its quantized W the same way):

    y = x @ W (+ bias) + dropout(x) @ A @ B * (alpha / r)

A and B are laid out like W (A's input axes are W's input axes, B's output axes W's output axes, r is the
unsharded ``lora_rank`` axis), so they shard like the weight they adapt, and the HF tensors of PEFT's
layout are W's reshape/transposes (``apriel_jax/checkpoint/peft_adapters.py``). A starts uniform in
+-1/sqrt(fan_in) (PEFT's default, kaiming-uniform with a=sqrt(5)), B at zero, so a fresh adapter leaves
the model's output exactly unchanged.

Target names are PEFT's (the HF module names): ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``
in every decoder layer, ``linear_1 linear_2`` in the projector. The adapters are the model config's
``lora`` block; a config without one (or with rank 0) builds the plain model, so every existing config and
checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from apriel_jax.model.layers import Linear, logical_param
from apriel_jax.model.quant import DECODER_PROJECTIONS, QuantizedLinear
from apriel_jax.model.quant import enabled as quant_enabled

# PEFT / HF module name -> (sub-module, attribute) inside one decoder layer.
DECODER_TARGETS = DECODER_PROJECTIONS
PROJECTOR_TARGETS = ("linear_1", "linear_2")
TARGETS = (*DECODER_TARGETS, *PROJECTOR_TARGETS)
RANK_AXIS = "lora_rank"


def lora_config(**overrides) -> ml_collections.ConfigDict:
    """LoRA settings: rank 0 (or no target) means no adapters."""
    cfg = ml_collections.ConfigDict(dict(
        rank=0,
        alpha=16.0,  # the update is scaled by alpha / rank
        dropout=0.0,  # on the adapter's input, in training steps only
        target_modules=tuple(DECODER_TARGETS),  # PEFT names; add "linear_1", "linear_2" for the projector
    ))
    cfg.update(overrides)
    return cfg


def enabled(model_cfg) -> bool:
    """Whether a model config asks for adapters."""
    lora = model_cfg.get("lora")
    return bool(lora is not None and lora.rank > 0 and lora.target_modules)


def with_lora(model_cfg, lora) -> ml_collections.ConfigDict:
    """A copy of ``model_cfg`` carrying the ``lora`` block."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    # A tuple, as the frozen config the model keeps turns lists into (so the two compare equal).
    cfg.lora = ml_collections.ConfigDict({**dict(lora), "target_modules": tuple(lora.target_modules)})
    return cfg


def without_lora(model_cfg) -> ml_collections.ConfigDict:
    """A copy of ``model_cfg`` without adapters: the config of the base (or merged) model."""
    cfg = model_cfg.to_dict()
    cfg.pop("lora", None)
    return ml_collections.ConfigDict(cfg)


def settings_problems(lora, where: str = "lora") -> list[str]:
    """What is wrong with a ``lora`` block on its own (the layer widths are checked with the model)."""
    problems = []
    if not isinstance(lora.rank, int) or lora.rank < 0:
        problems.append(f"{where}.rank={lora.rank!r} must be an integer >= 0 (0: no adapters)")
    if not (math.isfinite(lora.alpha) and lora.alpha > 0):
        problems.append(f"{where}.alpha={lora.alpha!r} must be a positive finite number")
    if not (math.isfinite(lora.dropout) and 0.0 <= lora.dropout < 1.0):
        problems.append(f"{where}.dropout={lora.dropout!r} must be in [0, 1)")
    unknown = [t for t in lora.target_modules if t not in TARGETS]
    if unknown:
        problems.append(f"{where}.target_modules {unknown} match no layer of the model; targets are {list(TARGETS)}")
    if lora.rank > 0 and not lora.target_modules:
        problems.append(f"{where}.target_modules is empty: rank {lora.rank} adapts nothing")
    return problems


def _widths(model_cfg) -> dict[str, tuple[int, int]]:
    """(input, output) features of every target layer."""
    d, v = model_cfg.decoder, model_cfg.vision
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    return {
        "q_proj": (d.hidden_size, q), "k_proj": (d.hidden_size, kv), "v_proj": (d.hidden_size, kv),
        "o_proj": (q, d.hidden_size), "gate_proj": (d.hidden_size, d.intermediate_size),
        "up_proj": (d.hidden_size, d.intermediate_size), "down_proj": (d.intermediate_size, d.hidden_size),
        "linear_1": (v.hidden_size, d.hidden_size), "linear_2": (d.hidden_size, d.hidden_size),
    }


def config_problems(model_cfg) -> list[str]:
    """What is wrong with a model config's ``lora`` block, including ranks wider than a target layer."""
    lora = model_cfg.get("lora")
    if lora is None:
        return []
    problems = settings_problems(lora)
    if problems or not enabled(model_cfg):
        return problems
    widths = _widths(model_cfg)
    for name in lora.target_modules:
        if lora.rank > min(widths[name]):
            problems.append(f"lora.rank={lora.rank} is larger than {name} ({widths[name][0]} -> "
                            f"{widths[name][1]} features): a rank above the layer's width adds nothing")
    return problems


class Adapter:
    """The low-rank update shared by LoRALinear and QuantizedLoRALinear (a mixin on top of the layer class)."""

    def _init_adapter(self, shape, axes, dtype, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs) -> None:
        n = self.in_axes
        bound = 1.0 / math.sqrt(math.prod(shape[:n]))
        a = jax.random.uniform(rngs.params(), (*shape[:n], rank), dtype, -bound, bound)
        self.lora_a = logical_param(a, (*axes[:n], RANK_AXIS))
        self.lora_b = logical_param(jnp.zeros((rank, *shape[n:]), dtype), (RANK_AXIS, *axes[n:]))
        self.scale, self.dropout = alpha / rank, dropout
        # Set only for the length of a training forward pass (``dropout_keys``): None means no dropout, so
        # evaluation and generation are deterministic whatever the config says.
        self.dropout_key = None

    def _add_update(self, x: jax.Array, y: jax.Array) -> jax.Array:
        h = x.astype(self.dtype)
        if self.dropout_key is not None and self.dropout > 0:
            keep = 1.0 - self.dropout
            h = jnp.where(jax.random.bernoulli(self.dropout_key, keep, h.shape), h / keep, 0).astype(self.dtype)
        n = self.in_axes
        contract = ((tuple(range(h.ndim - n, h.ndim)), tuple(range(n))), ((), ()))
        low = jax.lax.dot_general(h, self.lora_a[...].astype(self.dtype), contract)
        update = jax.lax.dot_general(low, self.lora_b[...].astype(self.dtype), (((low.ndim - 1,), (0,)), ((), ())))
        return y + (update * self.scale).astype(y.dtype)


class LoRALinear(Adapter, Linear):
    """A ``Linear`` with a low-rank update; its kernel and bias are the base layer's own parameters, so
    their paths (``.../attn/q/kernel``) are those of the plain model and the adapters sit beside them
    (``.../attn/q/lora_a``, ``.../attn/q/lora_b``)."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float, *, rngs: nnx.Rngs):
        self.in_axes, self.dtype = base.in_axes, base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        axes = tuple(base.kernel.get_metadata()["out_sharding"])
        self._init_adapter(base.kernel.shape, axes, base.kernel.dtype, rank, alpha, dropout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._add_update(x, Linear.__call__(self, x))


class QuantizedLoRALinear(Adapter, QuantizedLinear):
    """Adapters (in the model's param dtype) beside a quantized frozen kernel (``model/quant.py``): the
    quantized leaves keep their paths (``.../attn/q/qkernel``), the adapters are those of LoRALinear."""

    def __init__(self, base: QuantizedLinear, rank: int, alpha: float, dropout: float, *, rngs: nnx.Rngs):
        self.in_axes, self.dtype, self.param_dtype = base.in_axes, base.dtype, base.param_dtype
        self.mode, self.group_size = base.mode, base.group_size
        self.qkernel, self.qscale, self.bias = base.qkernel, base.qscale, base.bias
        self.kernel_shape, self.kernel_axes = base.kernel_shape, base.kernel_axes
        self._init_adapter(base.kernel_shape, base.kernel_axes, base.param_dtype, rank, alpha, dropout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._add_update(x, QuantizedLinear.__call__(self, x))


def add_adapters(module: nnx.Module, targets: dict[str, tuple[str, ...]], lora, *, rngs: nnx.Rngs) -> None:
    """Replace each targeted ``Linear`` of ``module`` by a LoRALinear around it. ``targets``: PEFT name ->
    attribute path from ``module``; names the config does not target are left alone."""
    for name, path in targets.items():
        if name not in lora.target_modules:
            continue
        parent = module
        for attr in path[:-1]:
            parent = getattr(parent, attr)
        base = getattr(parent, path[-1])
        adapted = QuantizedLoRALinear if isinstance(base, QuantizedLinear) else LoRALinear
        setattr(parent, path[-1], adapted(base, lora.rank, lora.alpha, lora.dropout, rngs=rngs))


@contextlib.contextmanager
def dropout_keys(module: nnx.Module, key: jax.Array | None):
    """Give every adapter inside ``module`` its own dropout key (from ``key``) for the calls made inside the
    block; ``key`` None leaves them without dropout. The keys are removed again on exit, so a model is never
    left holding arrays of a finished trace."""
    adapters = [m for _, m in nnx.iter_modules(module) if isinstance(m, Adapter)] if key is not None else []
    for i, adapter in enumerate(adapters):
        adapter.dropout_key = jax.random.fold_in(key, i)
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.dropout_key = None


def is_adapter(path: str) -> bool:
    """Whether a "/"-joined parameter path names an adapter leaf."""
    return path.endswith(("/lora_a", "/lora_b"))


def split_adapters(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapter leaves, everything else) of a model state."""
    return nnx.split_state(state, lambda path, _: is_adapter("/".join(map(str, path))), ...)


def merge_adapters(state: nnx.State, model_cfg) -> tuple[nnx.State, ml_collections.ConfigDict]:
    """(state, config) of the plain model equal to this adapted one: every adapted kernel becomes
    W + (alpha / r) * A @ B (computed in fp32, stored in W's dtype) and the adapter leaves are dropped."""
    if not enabled(model_cfg):
        return state, model_cfg
    if quant_enabled(model_cfg):
        raise ValueError(f"cannot fold LoRA adapters into {model_cfg.quant.mode} kernels (the merged weight would "
                         "be rounded to the quantization grid): export the adapters (export_peft) and apply them to "
                         "the full-precision base, or load the checkpoint without quant and merge there")
    scale = model_cfg.lora.alpha / model_cfg.lora.rank
    flat = {"/".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(state)}
    merged = []
    for name, (path, var) in flat.items():
        if is_adapter(name):
            continue
        owner = name.removesuffix("/kernel")
        if name.endswith("/kernel") and f"{owner}/lora_a" in flat:
            a, b = flat[f"{owner}/lora_a"][1][...], flat[f"{owner}/lora_b"][1][...]
            var = var.replace(merged_kernel(var[...], a, b, scale))
        merged.append((path, var))
    return nnx.from_flat_state(merged), without_lora(model_cfg)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A @ B in fp32, in W's dtype; for one layer's arrays or for stacked ones."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    product = functools.partial(jnp.tensordot, axes=1)  # [*in, r] @ [r, *out] -> [*in, *out]
    # Stacked layers (kernel [L, *in, *out], a [L, *in, r], b [L, r, *out]) have one more axis in each.
    stacked = a.ndim + b.ndim == kernel.ndim + 3
    update = jax.vmap(product)(a, b) if stacked else product(a, b)
    return (kernel.astype(jnp.float32) + scale * update).astype(kernel.dtype)
