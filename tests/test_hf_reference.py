"""Self-checks for the tiny HF reference helpers in ``tests/hf_reference.py`` and ``tests/mistral_reference.py``."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

import hf_reference as ref
import mistral_reference as mref

VARIANTS = sorted(ref.TINY_VARIANTS)
# Row 0: one image; row 1: two images (one of a single patch); row 2: text only.
SIZES = [[(32, 48)], [(16, 16), (48, 32)], []]


@functools.lru_cache(maxsize=None)
def _model(variant: str):
    return ref.make_hf_model(ref.make_hf_config(**ref.TINY_VARIANTS[variant]), seed=0)


@functools.lru_cache(maxsize=None)
def _inputs(variant: str):
    vocab = ref.TINY_VARIANTS[variant]["vocab_size"]
    return ref.make_inputs(SIZES, vocab_size=vocab, seed=1)


def _safetensors_keys(path: str) -> set[str]:
    keys: set[str] = set()
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                keys.update(f.keys())
    return keys


# ---------------------------------------------------------------------------
# configs and models
# ---------------------------------------------------------------------------


def test_variant_configs():
    base = ref.make_hf_config(**ref.TINY_VARIANTS["base"])
    t, v = base.text_config, base.vision_config
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (64, 4, 2, 32)
    assert (v.hidden_size, v.num_attention_heads, v.head_dim, v.patch_size, v.image_size) == (64, 4, 16, 16, 256)
    assert v.hidden_act == "silu" and base.projector_hidden_act == "gelu" and base.multimodal_projector_bias
    assert t.rope_parameters["rope_theta"] == 1e6 and v.rope_parameters["rope_theta"] == 1e4
    assert base.image_token_id == 10 and base.vision_feature_layer == -1
    assert base.vision_feature_select_strategy == "full" and not base.tie_word_embeddings
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (11, 1, 2)
    assert t.sliding_window is None
    for cfg in (base, t, v):
        assert cfg._attn_implementation == "eager"

    g = ref.make_hf_config(**ref.TINY_VARIANTS["gelu_vision"])
    assert g.vision_config.hidden_act == "gelu" and not g.multimodal_projector_bias
    assert g.text_config.num_key_value_heads == 1 and g.text_config.rope_parameters["rope_theta"] == 1e9

    m = ref.make_hf_config(**ref.TINY_VARIANTS["mha"])
    assert m.text_config.num_key_value_heads == 4 and m.text_config.head_dim == 16
    assert m.text_config.num_hidden_layers == 3 and m.vision_config.num_hidden_layers == 3
    assert m.text_config.rms_norm_eps == 1e-6


def test_weights_randomised_and_seeded():
    model = _model("base")
    for name, p in model.named_parameters():
        p = p.detach()
        assert p.dtype == torch.float32
        if p.ndim == 1 and not name.endswith("bias"):  # norms
            assert not torch.allclose(p, torch.ones_like(p)), name
            assert 0.5 < float(p.mean()) < 1.5, name
        elif name.endswith("bias"):
            assert float(p.abs().max()) > 0, name
        elif "embed_tokens" not in name:
            assert 0.01 < float(p.std()) < 0.3, name
    assert not model.training

    again = ref.make_hf_model(model.config, seed=0).state_dict()
    other = ref.make_hf_model(model.config, seed=1).state_dict()
    for k, val in model.state_dict().items():
        assert torch.equal(val, again[k]), k
        assert not torch.equal(val, other[k]), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_reload_identical_logits(variant, tmp_path):
    model, inputs = _model(variant), _inputs(variant)
    logits = ref.hf_logits(model, inputs)
    b, s = inputs["input_ids"].shape
    assert logits.shape == (b, s, 1024) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    mask = inputs["attention_mask"].astype(bool)
    assert 0.3 < logits[mask].std() < 10.0  # neither vanishing nor exploding

    shard = "200KB" if variant == "mha" else None
    out = ref.save_hf_model(model, tmp_path / "hf", max_shard_size=shard)
    assert isinstance(out, str) and os.path.isdir(out)
    files = sorted(os.listdir(out))
    if shard:
        assert "model.safetensors.index.json" in files
        assert sum(f.endswith(".safetensors") for f in files) > 1
    else:
        assert "model.safetensors" in files

    # On-disk names: transformers 5.x writes the legacy 4.x layout by default.
    keys = _safetensors_keys(out)
    assert "language_model.lm_head.weight" in keys
    assert "language_model.model.embed_tokens.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "vision_tower.transformer.layers.0.attention.q_proj.weight" in keys
    assert "vision_tower.patch_conv.weight" in keys
    assert "multi_modal_projector.linear_1.weight" in keys
    assert ("multi_modal_projector.linear_2.bias" in keys) == ref.TINY_VARIANTS[variant]["projector_bias"]
    assert len(keys) == len(model.state_dict())

    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["image_token_index"] == 10
    assert cfg["text_config"]["rope_parameters"]["rope_theta"] == ref.TINY_VARIANTS[variant]["rope_theta"]
    assert cfg["text_config"]["head_dim"] == ref.TINY_VARIANTS[variant]["head_dim"]

    reloaded = ref.load_hf_model(out)
    assert reloaded.config._attn_implementation == "eager"
    np.testing.assert_array_equal(ref.hf_logits(reloaded, inputs), logits)


def test_sdpa_matches_eager_on_real_tokens(tmp_path):
    model, inputs = _model("base"), _inputs("base")
    eager = ref.hf_logits(model, inputs)
    other = ref.load_hf_model(ref.save_hf_model(model, tmp_path / "hf"))
    other.set_attn_implementation("sdpa")
    sdpa = ref.hf_logits(other, inputs)
    mask = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(sdpa[mask], eager[mask], atol=1e-4, rtol=0)


def test_left_padding_is_transparent():
    """A row's logits do not depend on how much left padding the batch adds."""
    model, inputs = _model("gelu_vision"), _inputs("gelu_vision")
    batched = ref.hf_logits(model, inputs)
    first = 0
    for b, sizes in enumerate(SIZES):
        n = int(inputs["attention_mask"][b].sum())
        single = {
            "input_ids": inputs["input_ids"][b : b + 1, -n:],
            "attention_mask": np.ones((1, n), np.int64),
        }
        if sizes:
            sizes_b = inputs["image_sizes"][first : first + len(sizes)]
            pv = inputs["pixel_values"][first : first + len(sizes)]
            # Crop the batch-wide padding down to this row's own largest image.
            single["pixel_values"] = pv[:, :, : sizes_b[:, 0].max(), : sizes_b[:, 1].max()]
            single["image_sizes"] = sizes_b
        first += len(sizes)
        np.testing.assert_allclose(ref.hf_logits(model, single)[0], batched[b, -n:], atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def test_image_token_layout():
    assert ref.image_token_layout(2, 3) == [10, 10, 10, 12, 10, 10, 10, 13]
    assert ref.image_token_layout(1, 1) == [10, 13]
    assert ref.image_token_layout(1, 2, img_id=5, break_id=6, end_id=7) == [5, 5, 7]


def test_make_inputs_layout():
    sizes = [[(32, 48)], [(16, 16), (48, 32), (64, 16)], [], [(16, 64)]]
    inp = ref.make_inputs(sizes, vocab_size=1024, seed=3)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert inp["pixel_values"].dtype == np.float32 and inp["image_sizes"].dtype == np.int64
    assert ids.shape == mask.shape and ids.shape[0] == len(sizes)
    n_img = sum(len(r) for r in sizes)
    assert inp["pixel_values"].shape == (n_img, 3, 64, 64)
    np.testing.assert_array_equal(inp["image_sizes"], [s for r in sizes for s in r])

    for b, row in enumerate(sizes):
        n = int(mask[b].sum())
        assert mask[b, -n:].all() and not mask[b, :-n].any()  # left padded
        assert (ids[b, :-n] == ref.PAD_ID).all()
        tokens = ids[b, -n:]
        assert tokens[0] == ref.BOS_ID
        expected = sum((h // 16) * (w // 16) for h, w in row)
        assert int((tokens == 10).sum()) == expected
        assert int((tokens == 13).sum()) == len(row)
        assert int((tokens == 12).sum()) == sum(h // 16 - 1 for h, _ in row)
        text = tokens[1:][~np.isin(tokens[1:], [10, 12, 13])]
        assert (text >= ref.FIRST_TEXT_ID).all() and (text < 1024).all()
        # each image's block appears in order
        pos = 1
        for h, w in row:
            block = ref.image_token_layout(h // 16, w // 16)
            while list(tokens[pos : pos + len(block)]) != block:
                assert tokens[pos] >= ref.FIRST_TEXT_ID
                pos += 1
            pos += len(block)

    pv = inp["pixel_values"]
    for i, (h, w) in enumerate(inp["image_sizes"]):
        assert (pv[i, :, h:, :] == 0).all() and (pv[i, :, :, w:] == 0).all()
        assert 0.8 < pv[i, :, :h, :w].std() < 1.2

    again = ref.make_inputs(sizes, vocab_size=1024, seed=3)
    for k in inp:
        np.testing.assert_array_equal(inp[k], again[k])

    longer = ref.make_inputs(sizes, vocab_size=1024, seed=3, seq_len=ids.shape[1] + 5)
    np.testing.assert_array_equal(longer["input_ids"][:, 5:], ids)
    right = ref.make_inputs(sizes, vocab_size=1024, seed=3, left_pad=False)
    assert right["attention_mask"][:, 0].all()
    with pytest.raises(ValueError):
        ref.make_inputs(sizes, vocab_size=1024, seed=3, seq_len=4)
    with pytest.raises(ValueError):
        ref.make_inputs([[(20, 32)]], vocab_size=1024)

    text_only = ref.make_inputs([[], []], vocab_size=1024)
    assert set(text_only) == {"input_ids", "attention_mask"}


def test_make_inputs_padding_matches_pixtral_image_processor():
    try:
        from transformers import PixtralImageProcessor

        proc = PixtralImageProcessor(patch_size=16)
    except Exception as e:  # pragma: no cover - depends on installed extras
        pytest.skip(f"PixtralImageProcessor unavailable: {e}")
    inp = ref.make_inputs(SIZES, vocab_size=1024, seed=1)
    images, sizes = [], inp["image_sizes"]
    for i, (h, w) in enumerate(sizes):
        images.append(inp["pixel_values"][i, :, :h, :w])
    out = proc(
        images=images,
        do_resize=False,
        do_rescale=False,
        do_normalize=False,
        do_convert_rgb=False,
        return_tensors="np",
        input_data_format="channels_first",
    )
    np.testing.assert_array_equal(np.asarray(out["pixel_values"]), inp["pixel_values"])
    np.testing.assert_array_equal(np.asarray(out["image_sizes"]), sizes)


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------


def test_hf_greedy_shape_and_matches_argmax_loop():
    model, inputs = _model("base"), _inputs("base")
    new = ref.hf_greedy(model, inputs)
    assert new.shape == (3, 32) and new.dtype == np.int64
    assert ((new >= 0) & (new < 1024)).all()

    # No-cache argmax loop through hf_logits reproduces the first steps.
    cur = dict(inputs)
    for step in range(4):
        nxt = ref.hf_logits(model, cur)[:, -1].argmax(-1)
        np.testing.assert_array_equal(nxt, new[:, step])
        cur["input_ids"] = np.concatenate([cur["input_ids"], nxt[:, None]], 1)
        cur["attention_mask"] = np.concatenate([cur["attention_mask"], np.ones((3, 1), np.int64)], 1)

    suppressed = ref.hf_greedy(model, inputs, max_new_tokens=8, suppress_eos=True)
    assert suppressed.shape == (3, 8) and not (suppressed == ref.EOS_ID).any()


# ---------------------------------------------------------------------------
# Mistral consolidated format
# ---------------------------------------------------------------------------


def _hf_forward_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF converter's permutation: each head's row 2p+s -> row s*hd/2+p (written independently)."""
    rows, cols = w.shape
    hd = rows // n_heads
    out = torch.empty_like(w)
    for h in range(n_heads):
        for p in range(hd // 2):
            for s in range(2):
                out[h * hd + s * (hd // 2) + p] = w[h * hd + 2 * p + s]
    return out


def _expected_mistral_keys(cfg) -> set[str]:
    keys = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    keys |= {"vision_encoder.patch_conv.weight", "vision_encoder.ln_pre.weight"}
    keys |= {"vision_language_adapter.w_in.weight", "vision_language_adapter.w_out.weight"}
    if cfg.multimodal_projector_bias:
        keys |= {"vision_language_adapter.w_in.bias", "vision_language_adapter.w_out.bias"}
    for i in range(cfg.text_config.num_hidden_layers):
        keys |= {f"layers.{i}.attention.w{x}.weight" for x in "qkvo"}
        keys |= {f"layers.{i}.feed_forward.w{x}.weight" for x in "123"}
        keys |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    for i in range(cfg.vision_config.num_hidden_layers):
        p = f"vision_encoder.transformer.layers.{i}."
        keys |= {f"{p}attention.w{x}.weight" for x in "qkvo"}
        keys |= {f"{p}feed_forward.w{x}.weight" for x in "123"}
        keys |= {f"{p}attention_norm.weight", f"{p}ffn_norm.weight"}
    return keys


@pytest.mark.parametrize("variant", VARIANTS)
def test_mistral_consolidated(variant, tmp_path):
    model = _model(variant)
    cfg = model.config
    out = mref.write_mistral_consolidated(model, tmp_path / "mistral")
    assert sorted(os.listdir(out)) == ["consolidated.safetensors", "params.json"]
    with safe_open(os.path.join(out, "consolidated.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert set(sd) == _expected_mistral_keys(cfg)

    hf = model.state_dict()
    lm, vt = "model.language_model.", "model.vision_tower."
    n_q, n_kv, n_v = (
        cfg.text_config.num_attention_heads,
        cfg.text_config.num_key_value_heads,
        cfg.vision_config.num_attention_heads,
    )
    pairs = {
        "tok_embeddings.weight": (lm + "embed_tokens.weight", None),
        "norm.weight": (lm + "norm.weight", None),
        "output.weight": ("lm_head.weight", None),
        "vision_encoder.patch_conv.weight": (vt + "patch_conv.weight", None),
        "vision_encoder.ln_pre.weight": (vt + "ln_pre.weight", None),
        "vision_language_adapter.w_in.weight": ("model.multi_modal_projector.linear_1.weight", None),
        "vision_language_adapter.w_out.weight": ("model.multi_modal_projector.linear_2.weight", None),
        "vision_language_adapter.w_in.bias": ("model.multi_modal_projector.linear_1.bias", None),
        "vision_language_adapter.w_out.bias": ("model.multi_modal_projector.linear_2.bias", None),
    }
    for i in range(cfg.text_config.num_hidden_layers):
        a, m = f"{lm}layers.{i}.self_attn.", f"{lm}layers.{i}.mlp."
        pairs |= {
            f"layers.{i}.attention.wq.weight": (a + "q_proj.weight", n_q),
            f"layers.{i}.attention.wk.weight": (a + "k_proj.weight", n_kv),
            f"layers.{i}.attention.wv.weight": (a + "v_proj.weight", None),
            f"layers.{i}.attention.wo.weight": (a + "o_proj.weight", None),
            f"layers.{i}.feed_forward.w1.weight": (m + "gate_proj.weight", None),
            f"layers.{i}.feed_forward.w2.weight": (m + "down_proj.weight", None),
            f"layers.{i}.feed_forward.w3.weight": (m + "up_proj.weight", None),
            f"layers.{i}.attention_norm.weight": (f"{lm}layers.{i}.input_layernorm.weight", None),
            f"layers.{i}.ffn_norm.weight": (f"{lm}layers.{i}.post_attention_layernorm.weight", None),
        }
    for i in range(cfg.vision_config.num_hidden_layers):
        src, dst = f"{vt}transformer.layers.{i}.", f"vision_encoder.transformer.layers.{i}."
        pairs |= {
            dst + "attention.wq.weight": (src + "attention.q_proj.weight", n_v),
            dst + "attention.wk.weight": (src + "attention.k_proj.weight", n_v),
            dst + "attention.wv.weight": (src + "attention.v_proj.weight", None),
            dst + "attention.wo.weight": (src + "attention.o_proj.weight", None),
            dst + "feed_forward.w1.weight": (src + "feed_forward.gate_proj.weight", None),
            dst + "feed_forward.w2.weight": (src + "feed_forward.down_proj.weight", None),
            dst + "feed_forward.w3.weight": (src + "feed_forward.up_proj.weight", None),
            dst + "attention_norm.weight": (src + "attention_norm.weight", None),
            dst + "ffn_norm.weight": (src + "ffn_norm.weight", None),
        }
    checked = 0
    for key, tensor in sd.items():
        hf_key, heads = pairs[key]
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        if heads is None:
            assert torch.equal(tensor, hf[hf_key]), key
        else:
            assert not torch.equal(tensor, hf[hf_key]), key  # really permuted
            assert torch.equal(_hf_forward_permute(tensor, heads), hf[hf_key]), key
        checked += 1
    assert checked == len(sd)

    with open(os.path.join(out, "params.json")) as f:
        params = json.load(f)
    t, v = cfg.text_config, cfg.vision_config
    assert params["dim"] == t.hidden_size and params["n_layers"] == t.num_hidden_layers
    assert params["head_dim"] == t.head_dim and params["hidden_dim"] == t.intermediate_size
    assert params["n_heads"] == n_q and params["n_kv_heads"] == n_kv
    assert params["rope_theta"] == ref.TINY_VARIANTS[variant]["rope_theta"]
    assert params["norm_eps"] == t.rms_norm_eps and params["vocab_size"] == t.vocab_size
    ve = params["vision_encoder"]
    assert ve["hidden_size"] == v.hidden_size and ve["num_channels"] == 3
    assert ve["image_size"] == 256 and ve["patch_size"] == 16 and ve["rope_theta"] == 1e4
    assert ve["intermediate_size"] == v.intermediate_size
    assert ve["num_hidden_layers"] == v.num_hidden_layers and ve["num_attention_heads"] == n_v
    assert (ve["image_token_id"], ve["image_break_token_id"], ve["image_end_token_id"]) == (10, 12, 13)
    assert ve["adapter_bias"] == cfg.multimodal_projector_bias
    assert ve.get("hidden_act", "silu") == v.hidden_act


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_mistral_interleaved_rope_equals_hf_rotate_half(tower):
    """Semantic check of the q/k row permutation, independent of its exact form.

    Attention scores from Mistral's rope (complex rotation of interleaved pairs
    (2p, 2p+1), with mistral-inference's 1-D / 2-D frequency tables) applied to
    the consolidated ``wq``/``wk`` equal those from HF's own rotary modules
    (rotate-half) applied to HF's ``q_proj``/``k_proj``.
    """
    model = _model("gelu_vision")  # text: GQA 4:1, head_dim 32 != hidden / heads
    sd = mref.mistral_consolidated_state_dict(model)
    gen = torch.Generator().manual_seed(0)
    if tower == "text":
        cfg = model.config.text_config
        hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        att = model.model.language_model.layers[0].self_attn
        wq, wk = sd["layers.0.attention.wq.weight"], sd["layers.0.attention.wk.weight"]
        n_tok = 9
        x = torch.randn(n_tok, cfg.hidden_size, generator=gen)
        inv = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.arange(n_tok).float()[:, None] * inv  # [T, hd/2]
        cos, sin = model.model.language_model.rotary_emb(x, torch.arange(n_tok)[None])
        cos, sin = cos[0], sin[0]
    else:
        cfg = model.config.vision_config
        hd, nq = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads
        nkv = nq
        att = model.model.vision_tower.transformer.layers[1].attention
        p = "vision_encoder.transformer.layers.1.attention."
        wq, wk = sd[p + "wq.weight"], sd[p + "wk.weight"]
        height, width = 3, 4
        n_tok = height * width
        x = torch.randn(n_tok, cfg.hidden_size, generator=gen)
        inv = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
        f_h = torch.outer(torch.arange(height).float(), inv[0::2])[:, None, :].expand(height, width, -1)
        f_w = torch.outer(torch.arange(width).float(), inv[1::2])[None, :, :].expand(height, width, -1)
        ang = torch.cat([f_h, f_w], -1).reshape(n_tok, hd // 2)
        hh, ww = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        pos = torch.stack([hh.flatten(), ww.flatten()], -1)
        cos, sin = model.model.vision_tower.patch_positional_embedding(x, pos)

    def mistral(w, n):
        y = (x @ w.T).view(n_tok, n, hd // 2, 2)
        z = torch.view_as_complex(y.contiguous()) * torch.polar(torch.ones_like(ang), ang)[:, None]
        return torch.view_as_real(z).reshape(n_tok, n, hd)

    def hf(w, n):
        y = (x @ w.detach().T).view(n_tok, n, hd)
        rot = torch.cat([-y[..., hd // 2 :], y[..., : hd // 2]], -1)
        return y * cos[:, None] + rot * sin[:, None]

    def scores(q, k):
        return torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(nq // nkv, dim=1))

    with torch.no_grad():
        s_m = scores(mistral(wq, nq), mistral(wk, nkv))
        s_h = scores(hf(att.q_proj.weight, nq), hf(att.k_proj.weight, nkv))
        # The unpermuted HF weights under Mistral's rope must NOT match (the test has teeth).
        s_bad = scores(mistral(att.q_proj.weight.detach(), nq), mistral(att.k_proj.weight.detach(), nkv))
    torch.testing.assert_close(s_m, s_h, atol=1e-4, rtol=1e-4)
    assert (s_bad - s_h).abs().max() > 1e-2
