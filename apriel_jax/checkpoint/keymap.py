"""One table that says, for every parameter of our model, which checkpoint tensor(s) it comes from.

A ``TensorMap`` pairs a parameter path (``decoder/layers/attn/q/kernel``) with an external tensor name
(``language_model.model.layers.{i}.self_attn.q_proj.weight``; ``{i}`` for stacked layers) and the two
pure reshapes/transposes between the layouts. Import, export, the Mistral format and shape checks all
read this table, so a tensor is named in exactly one place.

Layouts:
- ``hf4``: what ``save_pretrained`` writes (transformers 4.x names; 5.x renames back on save).
- ``hf5``: transformers >= 4.52 in-memory names (``model.language_model.*``, top-level ``lm_head``), which
  some tools save as is.
- ``mistral``: Mistral's consolidated format (``params.json``); q/k rows are in the interleaved RoPE
  order and are permuted per head to the rotate-half order our model (and HF) use.

Transforms use only ``.T``/``.reshape``/``.transpose`` so they work on numpy arrays and on
``jax.ShapeDtypeStruct`` through ``jax.eval_shape`` (shape checks without touching data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Transform = Callable[[object], object]


@dataclass(frozen=True)
class TensorMap:
    path: str  # our parameter path, "/"-separated
    name: str  # external tensor name, "{i}" = layer index for stacked parameters
    to_ours: Transform  # external tensor -> our (per-layer) tensor
    to_ext: Transform  # our (per-layer) tensor -> external tensor

    @property
    def stacked(self) -> bool:
        return "{i}" in self.name


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _heads_in(heads: int, head_dim: int) -> tuple[Transform, Transform]:
    """torch Linear [H*D, E] <-> our [E, H, D] (q/k/v projections)."""
    return (
        lambda w: w.reshape(heads, head_dim, w.shape[-1]).transpose(2, 0, 1),
        lambda k: k.transpose(1, 2, 0).reshape(heads * head_dim, k.shape[0]),
    )


def _heads_out(heads: int, head_dim: int) -> tuple[Transform, Transform]:
    """torch Linear [E, H*D] <-> our [H, D, E] (output projection)."""
    return (
        lambda w: w.reshape(w.shape[0], heads, head_dim).transpose(1, 2, 0),
        lambda k: k.transpose(2, 0, 1).reshape(k.shape[2], heads * head_dim),
    )


def _patch_conv(patch: int, channels: int) -> tuple[Transform, Transform]:
    """Conv2d weight [O, C, p, p] <-> our patch-embedding kernel [p*p*C, O] over (row, col, channel)
    flattened patches: a stride-p convolution is exactly this matmul."""
    return (
        lambda w: w.transpose(2, 3, 1, 0).reshape(patch * patch * channels, w.shape[0]),
        lambda k: k.reshape(patch, patch, channels, k.shape[1]).transpose(3, 2, 0, 1),
    )


def _interleaved_to_half(heads: int, head_dim: int) -> Transform:
    """Mistral's interleaved q/k rows (pairs 2p, 2p+1) -> rotate-half rows (p, p + D/2), per head."""
    return lambda w: w.reshape(heads, head_dim // 2, 2, w.shape[-1]).transpose(0, 2, 1, 3).reshape(w.shape)


def _half_to_interleaved(heads: int, head_dim: int) -> Transform:
    return lambda w: w.reshape(heads, 2, head_dim // 2, w.shape[-1]).transpose(0, 2, 1, 3).reshape(w.shape)


def _compose(first: Transform, then: Transform) -> Transform:
    return lambda x: then(first(x))


_PREFIXES = {
    "hf4": ("vision_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.weight"),
    "hf5": ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.weight"),
}

# Per-tower names: (our sub-path, HF suffix, Mistral suffix).
_VISION_LAYER = {
    "attention_norm/scale": ("attention_norm.weight", "attention_norm.weight"),
    "ffn_norm/scale": ("ffn_norm.weight", "ffn_norm.weight"),
    "attn/q/kernel": ("attention.q_proj.weight", "attention.wq.weight"),
    "attn/k/kernel": ("attention.k_proj.weight", "attention.wk.weight"),
    "attn/v/kernel": ("attention.v_proj.weight", "attention.wv.weight"),
    "attn/o/kernel": ("attention.o_proj.weight", "attention.wo.weight"),
    "mlp/gate/kernel": ("feed_forward.gate_proj.weight", "feed_forward.w1.weight"),
    "mlp/up/kernel": ("feed_forward.up_proj.weight", "feed_forward.w3.weight"),
    "mlp/down/kernel": ("feed_forward.down_proj.weight", "feed_forward.w2.weight"),
}
_DECODER_LAYER = {
    "input_norm/scale": ("input_layernorm.weight", "attention_norm.weight"),
    "post_attn_norm/scale": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "attn/q/kernel": ("self_attn.q_proj.weight", "attention.wq.weight"),
    "attn/k/kernel": ("self_attn.k_proj.weight", "attention.wk.weight"),
    "attn/v/kernel": ("self_attn.v_proj.weight", "attention.wv.weight"),
    "attn/o/kernel": ("self_attn.o_proj.weight", "attention.wo.weight"),
    "mlp/gate/kernel": ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    "mlp/up/kernel": ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    "mlp/down/kernel": ("mlp.down_proj.weight", "feed_forward.w2.weight"),
}


def _layer_transforms(heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[Transform, Transform]]:
    linear = (_transpose, _transpose)
    return {
        "q": _heads_in(heads, head_dim),
        "k": _heads_in(kv_heads, head_dim),
        "v": _heads_in(kv_heads, head_dim),
        "o": _heads_out(heads, head_dim),
        "gate": linear,
        "up": linear,
        "down": linear,
        "norm": (_identity, _identity),
    }


def _transform_for(sub: str, table) -> tuple[Transform, Transform]:
    kind = sub.split("/")[-2] if sub.endswith("kernel") else "norm"
    return table[kind]


def key_map(cfg, layout: str = "hf4") -> list[TensorMap]:
    """Every parameter of a model with config ``cfg`` and its tensor in the given checkpoint layout."""
    if layout not in ("hf4", "hf5", "mistral"):
        raise ValueError(f"unknown checkpoint layout {layout!r}")
    v, d = cfg.vision, cfg.decoder
    mistral = layout == "mistral"
    vis_t = _layer_transforms(v.num_heads, v.num_heads, v.head_dim)
    dec_t = _layer_transforms(d.num_heads, d.num_kv_heads, d.head_dim)
    if mistral:
        vis_pre, proj_pre, dec_pre = "vision_encoder.", "vision_language_adapter.", ""
        for table, cfg_t, heads in ((vis_t, v, v.num_heads), (dec_t, d, d.num_kv_heads)):
            q_in, q_out = table["q"]
            k_in, k_out = table["k"]
            table["q"] = (_compose(_interleaved_to_half(cfg_t.num_heads, cfg_t.head_dim), q_in),
                          _compose(q_out, _half_to_interleaved(cfg_t.num_heads, cfg_t.head_dim)))
            table["k"] = (_compose(_interleaved_to_half(heads, cfg_t.head_dim), k_in),
                          _compose(k_out, _half_to_interleaved(heads, cfg_t.head_dim)))
    else:
        vis_pre, proj_pre, dec_pre, head_name = _PREFIXES[layout]

    col = 1 if mistral else 0
    maps: list[TensorMap] = []
    conv_in, conv_out = _patch_conv(v.patch_size, v.num_channels)
    maps.append(TensorMap("vision/patch_embed/kernel", vis_pre + "patch_conv.weight", conv_in, conv_out))
    maps.append(TensorMap("vision/ln_pre/scale", vis_pre + "ln_pre.weight", _identity, _identity))
    for sub, names in _VISION_LAYER.items():
        to_ours, to_ext = _transform_for(sub, vis_t)
        maps.append(TensorMap(f"vision/layers/{sub}", f"{vis_pre}transformer.layers.{{i}}.{names[col]}", to_ours, to_ext))

    proj_names = ("w_in", "w_out") if mistral else ("linear_1", "linear_2")
    for ours, theirs in zip(("linear_1", "linear_2"), proj_names):
        maps.append(TensorMap(f"projector/{ours}/kernel", f"{proj_pre}{theirs}.weight", _transpose, _transpose))
        if cfg.projector.bias:
            maps.append(TensorMap(f"projector/{ours}/bias", f"{proj_pre}{theirs}.bias", _identity, _identity))

    layer_pre = "layers.{i}." if mistral else dec_pre + "layers.{i}."
    for sub, names in _DECODER_LAYER.items():
        to_ours, to_ext = _transform_for(sub, dec_t)
        maps.append(TensorMap(f"decoder/layers/{sub}", layer_pre + names[col], to_ours, to_ext))
    maps.append(TensorMap("decoder/embed", "tok_embeddings.weight" if mistral else dec_pre + "embed_tokens.weight",
                          _identity, _identity))
    maps.append(TensorMap("decoder/norm/scale", "norm.weight" if mistral else dec_pre + "norm.weight",
                          _identity, _identity))
    if not d.tie_embeddings:
        maps.append(TensorMap("decoder/lm_head/kernel", "output.weight" if mistral else head_name,
                              _transpose, _transpose))
    return maps


def detect_layout(names) -> str:
    """Which layout a set of tensor names uses (error if none fits)."""
    names = set(names)
    if "language_model.model.embed_tokens.weight" in names:
        return "hf4"
    if "model.language_model.embed_tokens.weight" in names:
        return "hf5"
    if "tok_embeddings.weight" in names:
        return "mistral"
    sample = ", ".join(sorted(names)[:5])
    raise ValueError(f"unrecognised checkpoint layout: no token embedding tensor found (first names: {sample})")


def expand(maps: list[TensorMap], num_layers: dict[str, int]) -> dict[str, tuple[TensorMap, int | None]]:
    """External tensor name -> (its map, layer index or None). ``num_layers`` per tower prefix."""
    out = {}
    for m in maps:
        if m.stacked:
            for i in range(num_layers[m.path.split("/")[0]]):
                out[m.name.format(i=i)] = (m, i)
        else:
            out[m.name] = (m, None)
    return out
