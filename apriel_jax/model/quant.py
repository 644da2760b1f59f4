"""Weight-only quantization of the frozen base: the decoder projections in int8 per output channel or int4
per group, optionally the token embedding and the LM head in int8 per vocabulary row.

For the one-chip tier (LoRA fine-tuning of the 15B on a 16 GB v5e with an int4 base, on a 32 GB v6e with
an int8 one) the frozen base must shrink. What is quantized, and why:

- **The decoder's seven projections** (q/k/v/o, gate/up/down) in every layer: 12.9B of the 15B
  parameters. They are the bulk of the bytes, and a LoRA stage never trains them.
- **The token embedding and the LM head, only with** ``quant.embeddings`` (2 x 0.67B parameters, 1.34 GB
  each in bf16): always int8 with one fp32 scale per vocabulary row, whatever the projections' mode. Off
  by default: the loss and every greedy decision read the LM head directly, with no later layer to absorb
  its rounding; int4 there would cost more than the 0.67 GB it saves over int8. On for the 16 GB v5e
  config, where those 1.34 GB decide the fit. The embedding is a gather of int8 rows scaled after the
  gather; the LM head's int8 values are converted chunk by chunk inside the chunked loss (train/loss.py),
  so no bf16 copy of either table exists.
- Not the norms (tiny gains), the vision tower (0.4B) nor the projector (0.03B): small, and adapters may
  target the projector in its own dtype.

Formats (symmetric, no zero point; the values are exact in bf16, so the dot runs on the MXU in bf16):

- ``int8``: ``W ~ q * s[out]``, q in [-127, 127], one fp32 scale per output channel (absmax / 127). The
  scale is applied to the dot's output: ``y = (x @ q) * s``. Scales are fp32: there are only ~2M of them
  in the 15B (8 MB), and bf16's 2^-9 rounding would add a per-channel gain error comparable to int8's step.
- ``int4``: ``W ~ q * s[group, out]`` with groups of ``group_size`` along the (last) input axis, q in
  [-7, 7] stored as ``jnp.int4`` (half a byte on TPU) in the grouped shape (that axis split into groups x
  group size: [5120, 14336] is stored [40, 128, 14336]), one bf16 scale per group and output (absmax / 7).
  bf16 here: the scales are 1/128 of the weights (0.2 GB in the 15B; fp32 would double it) and their
  rounding is small beside int4's own step of 1/14 of the group's range. The weight is dequantized in
  the dot's operand (convert x scale, per group) and multiplied in the compute dtype; the dot contracts
  the grouped axes directly. Stored flat, the values would have to be regrouped inside the step, and
  XLA:TPU then materialises the broadcast scales as a weight-sized bf16 array per projection (147 MB per
  15B MLP kernel, temporaries measured on the compiled v5e step) instead of fusing them into the dot.

Quantized leaves (``qkernel``, ``qscale``) are ``QuantizedWeight`` variables, not ``nnx.Param``: the
trainable filters select Params only, so they can never get gradients or optimizer moments, and the
matmul's custom VJP differentiates with respect to the input alone (its residuals are the quantized
values themselves, never a dequantized copy of the weight). They carry the weight's logical axes
(``embed``, ``mlp``, ...; none on an int4 groups axis, see ``values_axes`` and ``scale_axes``) and are
stacked over ``layers`` like every decoder weight, so they shard as the bf16 weights would.

The model config's ``quant`` block turns this on; a config without one (or with mode ``none``) builds the
plain model, so every existing config and checkpoint is unchanged (a saved block without ``embeddings``
means False).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from apriel_jax.model.layers import Linear

MODES = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 128
INT8_MAX, INT4_MAX = 127, 7
# PEFT / HF module name -> (sub-module, attribute) inside one decoder layer: what is quantized (and what
# LoRA targets in the decoder, ``model/lora.py``).
DECODER_PROJECTIONS = {
    "q_proj": ("attn", "q"), "k_proj": ("attn", "k"), "v_proj": ("attn", "v"), "o_proj": ("attn", "o"),
    "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"), "down_proj": ("mlp", "down"),
}
QUANTIZED_LEAVES = ("qkernel", "qscale")
# The vocabulary tables ``quant.embeddings`` stores in int8: (owner path, path of the full-precision weight).
EMBEDDING_TABLES = {"decoder/embed": "decoder/embed", "decoder/lm_head": "decoder/lm_head/kernel"}


# ------------------------------------------------------------------------------------------ config


def quant_config(**overrides) -> ml_collections.ConfigDict:
    """Quantization settings: mode ``none`` means the plain model."""
    cfg = ml_collections.ConfigDict(dict(mode="none", group_size=DEFAULT_GROUP_SIZE, embeddings=False))
    cfg.update(overrides)
    return cfg


def enabled(model_cfg) -> bool:
    """Whether a model config asks for a quantized base."""
    quant = model_cfg.get("quant")
    return bool(quant is not None and quant.mode != "none")


def embeddings_enabled(model_cfg) -> bool:
    """Whether a model config stores its embedding and LM head in int8 (older saved blocks lack the key)."""
    return enabled(model_cfg) and bool(model_cfg.quant.get("embeddings", False))


def with_quant(model_cfg, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
               embeddings: bool = False) -> ml_collections.ConfigDict:
    """A copy of ``model_cfg`` carrying a ``quant`` block (mode ``none`` drops it)."""
    cfg = without_quant(model_cfg)
    if mode != "none":
        cfg.quant = quant_config(mode=mode, group_size=int(group_size), embeddings=bool(embeddings))
    return cfg


def without_quant(model_cfg) -> ml_collections.ConfigDict:
    """A copy of ``model_cfg`` without quantization: the config of the full-precision model."""
    cfg = model_cfg.to_dict()
    cfg.pop("quant", None)
    return ml_collections.ConfigDict(cfg)


def settings_problems(quant, where: str = "quant") -> list[str]:
    """What is wrong with a ``quant`` block on its own (the layer widths are checked with the model)."""
    problems = []
    if quant.mode not in MODES:
        problems.append(f"{where}.mode={quant.mode!r} is not one of {MODES}")
    if not isinstance(quant.group_size, int) or quant.group_size < 1:
        problems.append(f"{where}.group_size={quant.group_size!r} must be a positive integer")
    if not isinstance(quant.get("embeddings", False), bool):
        problems.append(f"{where}.embeddings={quant.embeddings!r} must be True or False")
    return problems


def _group_axis_widths(model_cfg) -> dict[str, int]:
    """Width of the input axis int4 groups run along, per projection (the last input axis of the kernel:
    hidden for q/k/v/gate/up, head_dim for o, whose kernel is [heads, head_dim, embed], intermediate for
    down)."""
    d = model_cfg.decoder
    return {"q_proj": d.hidden_size, "k_proj": d.hidden_size, "v_proj": d.hidden_size, "o_proj": d.head_dim,
            "gate_proj": d.hidden_size, "up_proj": d.hidden_size, "down_proj": d.intermediate_size}


def config_problems(model_cfg) -> list[str]:
    """What is wrong with a model config's ``quant`` block, including an int4 group that does not divide a
    projection's input axis."""
    quant = model_cfg.get("quant")
    if quant is None:
        return []
    problems = settings_problems(quant)
    if problems or quant.mode != "int4":
        return problems
    bad = {name: w for name, w in _group_axis_widths(model_cfg).items() if w % quant.group_size}
    if bad:
        listed = ", ".join(f"{name} ({w})" for name, w in bad.items())
        problems.append(f"quant.group_size={quant.group_size} does not divide the input axis of {listed}: int4 "
                        f"groups run along it (o_proj's is head_dim); pick a divisor, e.g. 128 or 64")
    return problems


# ------------------------------------------------------------------------------------------ formats


class QuantizedWeight(nnx.Variable):
    """A frozen quantized array (values or scales). Not an ``nnx.Param``: never trained, never given
    optimizer state."""


def _variable(value: jax.Array, axes) -> QuantizedWeight:
    return QuantizedWeight(value, out_sharding=tuple(axes), eager_sharding=False)


def _grouped(shape, in_axes: int, groups: int) -> tuple[int, ...]:
    """``shape`` with its last input axis split into (groups, group size)."""
    n = in_axes
    return (*shape[:n - 1], groups, shape[n - 1] // groups, *shape[n:])


def quantize(w: jax.Array, in_axes: int, mode: str, group_size: int = DEFAULT_GROUP_SIZE):
    """(values, scales) of one layer's kernel ``w`` [*in, *out] (computed in fp32).

    int8: values int8 like ``w``, scales fp32 [*out]. int4: values int4 shaped like ``w`` with its last input
    axis split into (groups, ``group_size``), scales bf16 like ``w`` with that axis divided by
    ``group_size``. An all-zero channel or group gets scale 1.
    """
    w = w.astype(jnp.float32)
    n = in_axes
    if mode == "int8":
        absmax = jnp.max(jnp.abs(w), axis=tuple(range(n)))
        scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
        q = jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        return q, scale
    if mode == "int4":
        if w.shape[n - 1] % group_size:
            raise ValueError(f"int4 group size {group_size} does not divide the input axis of a {w.shape} kernel")
        groups = w.shape[n - 1] // group_size
        g = w.reshape(_grouped(w.shape, n, groups))
        absmax = jnp.max(jnp.abs(g), axis=n)
        # Stored in bf16; the values are rounded against the stored scale, so |w - q * s| <= s / 2 holds
        # for the scale the model multiplies by (bf16 rounding keeps absmax / s below 7.5).
        scale = jnp.where(absmax > 0, absmax / INT4_MAX, 1.0).astype(jnp.bfloat16)
        q = jnp.clip(jnp.round(g / jnp.expand_dims(scale.astype(jnp.float32), n)), -INT4_MAX, INT4_MAX)
        return q.astype(jnp.int4), scale
    raise ValueError(f"unknown quantization mode {mode!r}; modes are {MODES[1:]}")


def dequantize(q: jax.Array, scale: jax.Array, in_axes: int, mode: str, dtype=jnp.float32) -> jax.Array:
    """The weight ``q`` and ``scale`` stand for, in ``dtype`` (one layer's arrays)."""
    if mode == "int8":
        return q.astype(dtype) * scale.astype(dtype)
    return _int4_weight(q, scale, in_axes, dtype)


def _int4_weight(q, scale, in_axes, dtype):
    return _grouped_int4(q, scale, in_axes, dtype).reshape(ungrouped_shape(q.shape, in_axes))


def ungrouped_shape(shape, in_axes: int) -> tuple[int, ...]:
    """The kernel shape [*in, *out] behind a grouped int4 values shape (its groups axis merged back)."""
    n = in_axes
    return (*shape[:n - 1], shape[n - 1] * shape[n], *shape[n + 1:])


def _grouped_int4(q, scale, in_axes, dtype):
    """The int4 weight in ``dtype``, grouped as stored: values converted and multiplied by their scales."""
    return q.astype(dtype) * jnp.expand_dims(scale.astype(dtype), in_axes)


def _split_groups(x, groups):
    """x [..., in] -> [..., groups, in / groups]: the input split like an int4 weight's last input axis."""
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def values_axes(axes, in_axes: int, mode: str) -> tuple:
    """Logical axes of the quantized values: the weight's; for int4 (stored grouped) its last input axis
    split into a groups axis on no mesh axis (None, as for the scales) and the within-group axis, which
    keeps the weight's mesh axis (a group of 128 splits over up to 128 devices)."""
    if mode == "int8":
        return tuple(axes)
    return (*axes[:in_axes - 1], None, *axes[in_axes - 1:])


def scale_axes(axes, in_axes: int, mode: str) -> tuple:
    """Logical axes of a scale array: the weight's own output axes (it shards like the weight along them);
    for int4 also its leading input axes, and no mesh axis (None) for the group axis. Groups are replicated
    because their count need not divide the mesh (the 15B's 40 groups of 5120 would not split over 16
    chips); int4 scales are 1/256 of the bf16 weight's bytes, so that costs at most 0.2 GB per chip."""
    if mode == "int8":
        return tuple(axes[in_axes:])
    return (*axes[:in_axes - 1], None, *axes[in_axes:])


# ------------------------------------------------------------------------------------------ matmul


def _dot(x, w, in_axes):
    """x [..., *in] @ w [*in, *out]."""
    contract = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes)))
    return jax.lax.dot_general(x, w, (contract, ((), ())))


def _dot_t(g, w, in_axes):
    """g [..., *out] @ w^T: the input's cotangent, contracting the weight's output axes."""
    out_axes = w.ndim - in_axes
    contract = (tuple(range(g.ndim - out_axes, g.ndim)), tuple(range(in_axes, w.ndim)))
    return jax.lax.dot_general(g, w, (contract, ((), ())))


def _weight_first_dot_t(g, w, in_axes):
    """``_dot_t`` with the weight as the dot's first operand, then the result's axes moved back.

    The same numbers, for the int4 kernels with one output axis (o, gate, up, down). As the second operand
    of the transposed dot, XLA:TPU materialised one layer's dequantized gate/up/down weights in bf16 in the
    15B step's backward pass (147 MB each); as the first operand the convert and scale fuse into the dot as
    in the forward pass. Not for q/k/v ([groups, group, heads, head_dim]): there XLA then copied the whole
    stacked int4 kernels into another layout (0.7 GB on v5e), more than their per-layer bf16 weights cost
    (42 / 10 / 10 MB). Measured with ``benchmarks/quant_aot.py`` and the v5e buffer assignment."""
    out_axes = w.ndim - in_axes
    batch = g.ndim - out_axes
    contract = (tuple(range(in_axes, w.ndim)), tuple(range(batch, g.ndim)))
    y = jax.lax.dot_general(w, g, (contract, ((), ())))  # [*in, *batch]
    return jnp.moveaxis(y, tuple(range(in_axes, in_axes + batch)), tuple(range(batch)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def quantized_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, mode: str, in_axes: int) -> jax.Array:
    """x @ W for W = (q, scale), in x's dtype, differentiable in x only.

    int8: ``(x @ q) * s`` (the per-channel scale on the output); int4: ``x @ (q * s)`` with the group
    scales applied to the converted values in the dot's operand."""
    if mode == "int8":
        return _dot(x, q.astype(x.dtype), in_axes) * scale.astype(x.dtype)
    groups = scale.shape[in_axes - 1]
    return _dot(_split_groups(x, groups), _grouped_int4(q, scale, in_axes, x.dtype), in_axes + 1)


def _matmul_fwd(x, q, scale, mode, in_axes):
    # Residuals: the quantized values and scales (already in memory), not a dequantized weight.
    return quantized_matmul(x, q, scale, mode, in_axes), (q, scale)


def _matmul_bwd(mode, in_axes, residuals, g):
    q, scale = residuals
    if mode == "int8":
        dx = _dot_t(g * scale.astype(g.dtype), q.astype(g.dtype), in_axes)
    else:  # [..., *in with the last one grouped], then the input's own shape
        w = _grouped_int4(q, scale, in_axes, g.dtype)
        dot_t = _weight_first_dot_t if w.ndim - (in_axes + 1) == 1 else _dot_t
        dx = dot_t(g, w, in_axes + 1)
        dx = dx.reshape(*dx.shape[:-(in_axes + 1)], *ungrouped_shape(q.shape, in_axes)[:in_axes])
    return dx, None, None


quantized_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class QuantizedLinear(nnx.Module):
    """A ``Linear`` whose kernel is stored quantized (``qkernel`` + ``qscale``) and frozen."""

    def __init__(self, base: Linear, mode: str, group_size: int = DEFAULT_GROUP_SIZE):
        self.in_axes, self.dtype = base.in_axes, base.dtype
        self.mode, self.group_size = mode, int(group_size)
        self.param_dtype = base.kernel.dtype  # of the bias and of adapters added on top
        # The full-precision kernel's shape and logical axes (static metadata): what adapters are built for.
        self.kernel_shape = tuple(base.kernel.shape)
        self.kernel_axes = axes = tuple(base.kernel.get_metadata()["out_sharding"])
        q, scale = quantize(base.kernel[...], base.in_axes, mode, group_size)
        self.qkernel = _variable(q, values_axes(axes, base.in_axes, mode))
        self.qscale = _variable(scale, scale_axes(axes, base.in_axes, mode))
        self.bias = base.bias

    def __call__(self, x: jax.Array) -> jax.Array:
        y = quantized_matmul(x.astype(self.dtype), self.qkernel[...], self.qscale[...], self.mode, self.in_axes)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class QuantizedEmbedding(nnx.Module):
    """A [vocab, embed] token table stored in int8 with one fp32 scale per row (``quant.embeddings``): a
    lookup gathers int8 rows and scales them, so the table is never converted whole."""

    def __init__(self, table: nnx.Param):
        axes = tuple(table.get_metadata()["out_sharding"])
        q, scale = quantize_embedding(table[...])
        self.qkernel = _variable(q, axes)
        self.qscale = _variable(scale, axes[:1])

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        rows = jnp.take(self.qkernel[...], tokens, axis=0).astype(dtype)
        return rows * jnp.take(self.qscale[...], tokens, axis=0)[..., None].astype(dtype)

    def as_head(self) -> "Int8Head":
        """The transposed table as an LM head (tied embeddings): the row scales are per-vocabulary scales."""
        return Int8Head(self.qkernel[...].T, self.qscale[...])


class Int8Head(NamedTuple):
    """An int8 LM head for the chunked loss and for logits: ``logits = (h @ values) * scales``."""

    values: jax.Array  # int8 [embed, vocab]
    scales: jax.Array  # fp32 [vocab]

    def logits(self, h: jax.Array, compute_dtype) -> jax.Array:
        """fp32 logits of ``h`` [..., embed]; the int8 values are converted in the dot's operand."""
        y = jnp.einsum("...e,ev->...v", h.astype(compute_dtype), self.values.astype(compute_dtype),
                       preferred_element_type=jnp.float32)
        return y * self.scales.astype(jnp.float32)


def quantize_embedding(table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 values [vocab, embed], fp32 scales [vocab]) of a token table: int8 per row."""
    q, scale = quantize(table.T, 1, "int8")
    return q.T, scale


def quantize_projections(module: nnx.Module, quant) -> None:
    """Replace the seven projections of a decoder layer ``module`` by QuantizedLinears (``quant``: the model
    config's block; mode ``none`` leaves them alone)."""
    if quant is None or quant.mode == "none":
        return
    for parent_name, attr in DECODER_PROJECTIONS.values():
        parent = getattr(module, parent_name)
        setattr(parent, attr, QuantizedLinear(getattr(parent, attr), quant.mode, quant.group_size))


def quantize_embeddings(decoder: nnx.Module, quant) -> None:
    """With ``quant.embeddings``: the decoder's token table and its (untied) LM head in int8."""
    if quant is None or quant.mode == "none" or not quant.get("embeddings", False):
        return
    decoder.embed = QuantizedEmbedding(decoder.embed)
    if decoder.lm_head is not None:
        decoder.lm_head = QuantizedLinear(decoder.lm_head, "int8")


def full_precision_path(quantized_path: str) -> str:
    """The path of the full-precision weight a quantized leaf (``.../qkernel`` or ``.../qscale``) stands for:
    ``decoder/embed`` for the token table, ``OWNER/kernel`` for every projection."""
    owner = quantized_path.rsplit("/", 1)[0]
    return EMBEDDING_TABLES.get(owner, f"{owner}/kernel")


def quantizer(quantized_path: str, quant) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """``w -> (values, scales)`` for the full-precision weight behind ``quantized_path`` (one layer of a
    stacked projection, or a whole vocabulary table), as the model quantizes it."""
    owner = quantized_path.rsplit("/", 1)[0]
    if owner == "decoder/embed":
        return quantize_embedding
    if owner == "decoder/lm_head":
        return lambda w: quantize(w, 1, "int8")
    return functools.partial(quantize, in_axes=kernel_in_axes(quantized_path), mode=quant.mode,
                             group_size=quant.group_size)


def is_stacked(path: str) -> bool:
    """Whether a parameter path is stacked over the decoder layers (a leading ``layers`` axis)."""
    return path.startswith("decoder/layers/")


def is_quantized_leaf(path: str) -> bool:
    """Whether a "/"-joined state path names a quantized leaf."""
    return path.rsplit("/", 1)[-1] in QUANTIZED_LEAVES


def kernel_in_axes(path: str) -> int:
    """How many leading axes of the quantized projection at ``path`` (``.../attn/o/qkernel``) are inputs:
    two for o_proj ([heads, head_dim, embed]), one for the others."""
    return 2 if tuple(path.split("/")[-3:-1]) == DECODER_PROJECTIONS["o_proj"] else 1


def weight_bytes(state) -> dict[str, int]:
    """Bytes of a model state by kind: ``quantized`` (values + scales, int4 at half a byte as a TPU stores
    it) and ``other`` (everything else, in its dtype)."""
    totals = {"quantized": 0, "other": 0}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
        name = "/".join(str(k) for k in keys if k != "value")  # an nnx.State's leaves sit under Variable.value
        bits = 4 if x.dtype == jnp.int4 else jnp.dtype(x.dtype).itemsize * 8
        totals["quantized" if is_quantized_leaf(name) else "other"] += math.prod(x.shape) * bits // 8
    return totals
