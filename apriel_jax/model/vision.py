"""Pixtral vision encoder over packed, flattened patches.

Input is the batch contract's ``patches`` [B, P, p*p*C]: every image of a row, patch by patch,
row-major, padded to the static patch budget P. The patch embedding is a matmul over the flattened
(patch_row, patch_col, channel) pixels, which equals Pixtral's stride-p convolution; attention is
bidirectional and block-diagonal per image through ``patch_segment_ids``. There is no final norm: the
projector reads the last layer's output directly, as ``vision_feature_layer = -1`` does in HF.
"""

from __future__ import annotations

from flax import nnx

from apriel_jax.model.attention import SelfAttention
from apriel_jax.model.layers import GatedMLP, Linear, RMSNorm
from apriel_jax.model.rope import pixtral_angles
from apriel_jax.model.stack import make_stack, scan_stack
from apriel_jax.parallel.rules import ACTIVATION_AXES, constrain


class VisionLayer(nnx.Module):
    def __init__(self, cfg, *, impl, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.attn = SelfAttention(
            cfg.hidden_size, cfg.num_heads, cfg.num_heads, cfg.head_dim, causal=False, impl=impl, **kw
        )
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, **kw)

    def __call__(self, x, angles, segment_ids):
        x = constrain(x, ACTIVATION_AXES)
        x = x + self.attn(self.attention_norm(x), angles, segment_ids)[0]
        return constrain(x + self.mlp(self.ffn_norm(x)), ACTIVATION_AXES)


class VisionEncoder(nnx.Module):
    def __init__(self, cfg, *, impl="xla", remat_policy="none", feature_layer=-1, rngs, param_dtype, dtype):
        patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
        self.patch_embed = Linear((patch_dim, cfg.hidden_size), ("patch", "embed"), rngs=rngs,
                                  param_dtype=param_dtype, dtype=dtype)
        self.ln_pre = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.layers = make_stack(
            lambda r: VisionLayer(cfg, impl=impl, rngs=r, param_dtype=param_dtype, dtype=dtype),
            cfg.num_layers,
            rngs,
        )
        self.head_dim, self.rope_theta, self.remat_policy = cfg.head_dim, cfg.rope_theta, remat_policy
        # HF hidden_states[i]: 0 is the embedding after ln_pre, i the output of layer i.
        num_states = cfg.num_layers + 1
        if not -num_states <= feature_layer < num_states:
            raise ValueError(f"vision_feature_layer={feature_layer} out of range for {cfg.num_layers} layers")
        self.layers_used = feature_layer % num_states

    def __call__(self, patches, patch_positions, patch_segment_ids):
        """patches [B, P, p*p*C], positions [B, P, 2], segment ids [B, P] -> features [B, P, hidden]."""
        x = self.ln_pre(self.patch_embed(patches))
        if self.layers_used == 0:
            return x
        angles = pixtral_angles(patch_positions, self.head_dim, self.rope_theta)

        def body(layer, h, _):
            return layer(h, angles, patch_segment_ids), None

        x, _ = scan_stack(self.layers, body, x, remat_policy=self.remat_policy, num_layers=self.layers_used)
        return x
