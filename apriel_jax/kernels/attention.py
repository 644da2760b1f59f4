"""The one attention entry point of the project, with the plain-XLA implementation (the oracle).

Both towers call :func:`attention`. Documents packed into one row and images packed into one patch
sequence are separated by *segment ids*: a query attends to a key only when both carry the same
segment id, so no dense [S, S] mask is ever built by the caller. Fused kernels (Pallas on TPU/GPU,
splash, cuDNN) register further ``impl`` names; ``xla`` stays the reference every kernel is tested
against.

Implementations (registered by the modules of this package):

- ``xla``: the oracle below; handles everything (decoding with ``q_offset``, sliding windows).
- ``pallas``: our flash kernels, ``pallas_tpu`` (Mosaic) on TPU and ``pallas_gpu`` (Triton) elsewhere;
  both names can also be asked for explicitly (on CPU they run in interpret mode).
- ``splash``: jax's packaged TPU splash kernel (baseline; rejects head_dim 64).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only).
- ``xla_blocked``: plain XLA that skips fully masked causal blocks, hand-written backward (CPU).
- ``auto``: TPU -> ``pallas``; GPU -> ``cudnn`` when it supports the call, else ``pallas``; CPU -> ``xla_blocked``.

The fused kernels are training kernels: KV-cache decoding (a non-zero ``q_offset`` or Sq != Sk) always
runs on ``xla`` whatever ``impl`` says; a sliding window makes an explicit fused impl raise ValueError
(``auto`` falls back to ``xla``).

Shapes: q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] with Hq a multiple of Hkv (grouped-query attention:
k/v are never repeated in memory).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Additive mask value: large and finite, so a fully masked row (a padding query) softmaxes to a
# uniform distribution instead of NaN, and its gradient stays finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Names a kernel may give its backward-pass residuals (``jax.ad_checkpoint.checkpoint_name``): the
# ``attention`` remat policy keeps these and recomputes the rest of the layer. Only ``xla_blocked`` names
# them today; under another kernel the policy saves nothing more than ``full``.
SAVEABLE_RESIDUALS = ("attention_out", "attention_lse")

_IMPLEMENTATIONS: dict[str, Callable] = {}


def register(name: str):
    """Register an attention implementation under ``name`` (used by the kernel modules)."""

    def wrap(fn):
        _IMPLEMENTATIONS[name] = fn
        return fn

    return wrap


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool,
    impl: str = "xla",
    q_offset: jax.Array | int = 0,
    sliding_window: int = 0,
    scale: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention restricted to equal segment ids. Returns [B, Sq, Hq, D].

    ``q_offset`` is the index of the first query inside the key sequence; it is non-zero only when
    decoding against a KV cache (query i sits at key index ``q_offset + i``). Segment id 0 marks
    padding; padding queries produce finite garbage that callers mask out of the loss. A positive
    ``sliding_window`` (causal only) limits each query to the last ``sliding_window`` keys, itself included.
    """
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of key/value heads ({k.shape[-2]})")
    import apriel_jax.kernels  # noqa: F401  (the package imports every kernel module, which registers it)

    decoding = not (isinstance(q_offset, int) and q_offset == 0) or q.shape[1] != k.shape[1]
    if decoding or (impl == "auto" and sliding_window):
        impl = "xla"
    impl = resolve_impl(impl, q, k)
    try:
        fn = _IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown attention impl {impl!r}; available: {sorted(_IMPLEMENTATIONS)}") from None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if sliding_window and not causal:
        raise ValueError("sliding_window is only defined for causal attention")
    return fn(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset,
              sliding_window=sliding_window, scale=scale)


def target_platform() -> str:
    """The platform being compiled for: that of the mesh in context (``jax.set_mesh``), else the default
    backend. A TPU topology mesh on a CPU host (ahead-of-time compiles) says "tpu"."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _auto_impl(q: jax.Array, k: jax.Array) -> str:
    backend = target_platform()
    if backend == "tpu":
        return "pallas_tpu"
    if backend == "gpu":
        from apriel_jax.kernels.cudnn import cudnn_supports

        return "cudnn" if cudnn_supports(q, k) else "pallas_gpu"
    # CPU: the oracle's math, but causal blocks above the diagonal are never computed (blocked_xla.py).
    return "xla_blocked"


def resolve_impl(impl: str, q: jax.Array, k: jax.Array) -> str:
    """The implementation name :func:`attention` would run for a training call (no decoding)."""
    if impl == "auto":
        return _auto_impl(q, k)
    if impl == "pallas":
        return "pallas_tpu" if target_platform() == "tpu" else "pallas_gpu"
    return impl


def attention_mask(q_segment_ids, kv_segment_ids, *, causal: bool, q_offset=0, sliding_window=0) -> jax.Array:
    """Boolean [B, Sq, Sk] mask: same segment, and if causal key index <= query index (within the window)."""
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        q_idx = jnp.arange(q_segment_ids.shape[1])[None, :, None] + jnp.asarray(q_offset).reshape(-1, 1, 1)
        k_idx = jnp.arange(kv_segment_ids.shape[1])[None, None, :]
        mask = mask & (k_idx <= q_idx)
        if sliding_window:
            mask = mask & (q_idx - k_idx < sliding_window)
    return mask


@register("xla")
def xla_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, q_offset, sliding_window, scale):
    """Plain XLA attention, softmax in fp32.

    Grouped heads are folded into the query-length axis ([B, Hkv, G*Sq, D]) so both matmuls are
    batched 3-D GEMMs over (B, Hkv): XLA:CPU lowers that far better than a 5-D GQA einsum, and k/v are
    used without repetition.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    # [B, Sq, Hkv, G, D] -> [B, Hkv, G*Sq, D]
    qg = q.reshape(b, sq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * sq, d)
    kt = k.transpose(0, 2, 3, 1)  # [B, Hkv, D, Sk]
    vt = v.transpose(0, 2, 1, 3)  # [B, Hkv, Sk, D]
    logits = jnp.matmul(qg, kt, preferred_element_type=jnp.float32) * scale  # [B, Hkv, G*Sq, Sk]
    logits = logits.reshape(b, hkv, g, sq, sk)
    mask = attention_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset,
                          sliding_window=sliding_window)
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, hkv, g * sq, sk)
    out = jnp.matmul(probs, vt, preferred_element_type=jnp.float32).astype(q.dtype)  # [B, Hkv, G*Sq, D]
    return out.reshape(b, hkv, g, sq, d).transpose(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
