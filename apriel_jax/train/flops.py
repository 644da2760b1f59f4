"""Model FLOPs of a training step and per-chip peaks, for MFU.

The count is the one MaxText prints (and ``reference/cpu_perf_notes`` uses): 6 x (matmul parameters) x
tokens for forward + backward, plus attention scores and values: 2 matmuls of 2·S·S·H·D per layer in
the forward pass, halved for causal attention, x3 for training. Embedding lookups cost nothing; the LM
head is a matmul and counts. The vision tower attends within each image, so its attention term uses
the images' own patch counts, not the row's patch budget.
"""

from __future__ import annotations

from typing import Sequence

# Dense bf16 peak FLOP/s per chip (vendor figures). MFU on a backend not listed is reported as unknown.
PEAK_FLOPS_PER_CHIP = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def _decoder_matmul_params(d) -> int:
    attn = d.hidden_size * d.head_dim * (2 * d.num_heads + 2 * d.num_kv_heads)
    mlp = 3 * d.hidden_size * d.intermediate_size
    return d.num_layers * (attn + mlp) + d.hidden_size * d.vocab_size  # + LM head


def _vision_matmul_params(v) -> int:
    attn = 4 * v.hidden_size * v.num_heads * v.head_dim
    mlp = 3 * v.hidden_size * v.intermediate_size
    return v.num_layers * (attn + mlp) + v.patch_size**2 * v.num_channels * v.hidden_size


def _vision_forward(v, image_patch_counts: Sequence[int]) -> float:
    """The vision tower's forward FLOPs over images of these patch counts (each attends to itself only)."""
    matmuls = 2 * _vision_matmul_params(v) * sum(image_patch_counts)
    return matmuls + v.num_layers * sum(2 * 2 * n * n * v.num_heads * v.head_dim for n in image_patch_counts)


def train_step_flops(cfg, *, batch: int, seq_len: int, image_patch_counts: Sequence[int] = (),
                     train_vision: bool = True) -> float:
    """Model FLOPs of one training step (forward + backward) over ``batch`` rows of ``seq_len`` tokens.

    ``image_patch_counts`` lists the patches of every image in the step (all rows together).
    """
    d, v = cfg.decoder, cfg.vision
    tokens = batch * seq_len
    decoder = 6 * _decoder_matmul_params(d) * tokens
    decoder += 3 * d.num_layers * (2 * 2 * batch * seq_len**2 * d.num_heads * d.head_dim) / 2  # causal
    patches = sum(image_patch_counts)
    projector = 6 * patches * (v.hidden_size * d.hidden_size + d.hidden_size**2)
    vision_fwd = _vision_forward(v, image_patch_counts)
    # A frozen tower still runs forward, and backward through its activations only where gradients
    # must reach something trainable below it; with the encoder frozen nothing below it trains.
    vision = 3 * vision_fwd if train_vision else vision_fwd
    return float(decoder + projector + vision)


def generate_flops(cfg, *, batch: int, prompt_len: int, new_tokens: int, image_patch_counts: Sequence[int] = ()) -> float:
    """Model FLOPs of generating ``new_tokens`` tokens after a ``prompt_len``-token prompt for ``batch`` rows:
    the prefill's forward pass, then one token per row and step attending to every cached position."""
    d, v = cfg.decoder, cfg.vision
    head_flops = 2 * 2 * d.num_heads * d.head_dim  # QK^T and PV, per query-key pair and layer
    prefill = 2 * _decoder_matmul_params(d) * batch * prompt_len
    prefill += d.num_layers * head_flops * batch * prompt_len**2 / 2  # causal
    patches = sum(image_patch_counts)
    prefill += 2 * patches * (v.hidden_size * d.hidden_size + d.hidden_size**2) + _vision_forward(v, image_patch_counts)
    keys = new_tokens * prompt_len + new_tokens * (new_tokens - 1) / 2  # cached positions each new token reads
    decode = 2 * _decoder_matmul_params(d) * batch * new_tokens + d.num_layers * head_flops * batch * keys
    return float(prefill + decode)


def peak_flops(device_kind: str) -> float | None:
    """Per-chip peak for a ``jax.Device.device_kind`` string, or None when unknown (e.g. CPU)."""
    for name, peak in PEAK_FLOPS_PER_CHIP.items():
        if device_kind.lower().startswith(name.lower()):
            return peak
    return None
