"""Rotary position embeddings in the rotate-half layout of Hugging Face checkpoints.

HF weights are stored permuted for rotate-half (dimension j pairs with j + D/2), so no q/k permutation
is needed on import; the Mistral consolidated format (interleaved pairs) is permuted in
``checkpoint/mistral.py`` instead. Angles are computed in fp32 from positions directly (no table), so
any position up to the config's maximum works without a recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate x [..., S, H, D] by angles [..., S, D/2] (broadcast over heads)."""
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """theta^(-2k/D) for k = 0..D/2-1, computed as HF does (fp32 exponent, then reciprocal)."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponent)


def text_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """1-D RoPE angles [..., S, D/2] for integer positions [..., S]."""
    return positions.astype(jnp.float32)[..., None] * inverse_frequencies(head_dim, theta)


def pixtral_angles(patch_positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """Pixtral's 2-D ("axial") angles [..., P, D/2] for (row, col) positions [..., P, 2].

    The D/2 base frequencies are split alternately: even-indexed ones rotate with the row index and
    fill the first D/4 slots, odd-indexed ones rotate with the column index and fill the last D/4.
    """
    freqs = inverse_frequencies(head_dim, theta)
    rows = patch_positions[..., 0:1].astype(jnp.float32)
    cols = patch_positions[..., 1:2].astype(jnp.float32)
    return jnp.concatenate([rows * freqs[0::2], cols * freqs[1::2]], axis=-1)
