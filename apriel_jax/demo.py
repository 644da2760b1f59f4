"""A tiny end-to-end run: tokenizer -> sharded model -> multimodal forward -> checkpoint round trips ->
transformers parity -> KV-cached generation, in well under a minute on a laptop CPU.

It is the project's smoke test of the whole stack (``apriel-jax demo`` / ``make quickstart``): every
step checks its own result and raises :class:`DemoCheckFailed` on a mismatch, so a broken piece
fails the run loudly instead of printing a plausible-looking table.

Run it with ``apriel-jax demo [--config configs/quickstart.py] [--config.seed=3 ...]``; the default
config is :func:`default_config` (``configs/quickstart.py`` returns the same).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np

from apriel_jax.model.presets import get_preset

# A short, self-written corpus for the demo tokenizer: enough for a few hundred BPE merges.
BUILTIN_TEXT = """\
Apriel reads an image as a grid of small square patches. Each patch becomes one token for the
language model, and a break token ends every row of the grid, so the model knows where rows stop.
The last row ends with an end token instead of a break.
A vision encoder turns the patches into features, a projector maps them to the width of the
decoder, and the decoder writes text one token at a time, looking back at every earlier token.
Training a model of this size needs many devices. The parameters are split across a mesh of
devices, and each device holds only its own slice of every large matrix.
Checkpoints move between formats: the Hugging Face layout, the Mistral consolidated layout, and
our own checkpoints written with orbax. Converting there and back again must not change one bit.
What is in the first picture? What is in the second picture? Describe both images in one sentence.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64, 128, 256 and 1024 appear in text too.
"""

DEFAULT_PROMPT = "Describe both images in one sentence."


class DemoCheckFailed(RuntimeError):
    """A demo step produced a wrong result (as opposed to a usage error)."""


def default_config() -> ml_collections.ConfigDict:
    """The quickstart settings; every field can be overridden with ``--config.FIELD=VALUE``."""
    return ml_collections.ConfigDict(
        dict(
            # The whole model config (the `tiny` preset), so any architecture field can be overridden:
            # --config.model.decoder.num_layers=4
            model=get_preset("tiny"),
            seed=0,  # model init, random images and sampling
            out_dir="runs/quickstart",  # tokenizer, HF export, orbax checkpoint, round-trip export
            image_sizes=((48, 64), (32, 32)),  # (height, width) in pixels of the random prompt images
            prompt=DEFAULT_PROMPT,  # text after the images
            max_new_tokens=16,
            mesh=dict(data=1, fsdp=-1, tensor=1, sequence=1),  # -1: all remaining devices
            check_transformers=True,  # compare with LlavaForConditionalGeneration when importable
            transformers_rtol=1e-4,  # max |ours - hf| / max |hf| accepted in that comparison
            # Full-precision fp32 matmuls: GPUs may otherwise use TF32, which the parity check would catch.
            matmul_precision="highest",
        )
    )


# --------------------------------------------------------------------------------------------------
# Step bookkeeping
# --------------------------------------------------------------------------------------------------


class _Steps:
    """Times each step and remembers (name, result, seconds) for the summary table."""

    def __init__(self, log: Callable[[str], None]):
        self.rows: list[tuple[str, str, float]] = []
        self.log = log

    def run(self, name: str, fn: Callable[[], tuple[str, object]]):
        start = time.perf_counter()
        try:
            text, value = fn()
        except BaseException as e:
            self.rows.append((name, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              time.perf_counter() - start))
            self.log(self.table())
            raise
        seconds = time.perf_counter() - start
        self.rows.append((name, text, seconds))
        self.log(f"[{len(self.rows)}] {name}: {text} ({seconds:.2f}s)")
        return value

    def table(self) -> str:
        width = max([len(n) for n, _, _ in self.rows] + [4])
        lines = [f"{'step':<{width}}  {'time':>8}  result", f"{'-' * width}  {'-' * 8}  {'-' * 50}"]
        for name, text, seconds in self.rows:
            lines.append(f"{name:<{width}}  {seconds:>7.3f}s  {text}")
        total = sum(s for _, _, s in self.rows)
        lines.append(f"{'total':<{width}}  {total:>7.3f}s")
        return "\n".join(lines)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DemoCheckFailed(message)


# --------------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _jitted_forward():
    import jax
    from flax import nnx

    # graphdef is static (hashable): models with the same structure share one compilation.
    @functools.partial(jax.jit, static_argnums=0)
    def forward(graphdef, state, batch):
        return nnx.merge(graphdef, state)(batch)

    return forward


def forward_logits(model, batch: dict) -> np.ndarray:
    """Full-sequence fp32 logits [B, S, V] of ``model`` on a batch-contract dict, as numpy."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    inputs = dict(batch)
    if inputs.get("patches") is not None and inputs["patches"].shape[1] == 0:  # text only: no vision pass
        inputs = {k: v for k, v in inputs.items() if not k.startswith("patch")}
    return np.asarray(_jitted_forward()(graphdef, state, inputs))


def _random_images(sizes, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)) for h, w in sizes]


def _hf_style_inputs(ids: list[int], pixels: list[np.ndarray]) -> dict[str, np.ndarray]:
    """What a transformers Pixtral processor would return for one prompt: images CHW, zero-padded
    bottom/right to the largest one, with their true sizes."""
    inputs = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    if not pixels:
        return inputs
    h_max = max(p.shape[0] for p in pixels)
    w_max = max(p.shape[1] for p in pixels)
    pixel_values = np.zeros((len(pixels), 3, h_max, w_max), np.float32)
    for i, p in enumerate(pixels):
        pixel_values[i, :, : p.shape[0], : p.shape[1]] = p.transpose(2, 0, 1)
    return {**inputs, "pixel_values": pixel_values,
            "image_sizes": np.asarray([p.shape[:2] for p in pixels], np.int64)}


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _same_tensors(dir_a: Path, dir_b: Path) -> int:
    """Number of tensors compared; DemoCheckFailed unless names, dtypes, shapes and bytes all agree."""
    from apriel_jax.checkpoint.safetensors_io import SafetensorsCheckpoint

    a, b = SafetensorsCheckpoint(dir_a), SafetensorsCheckpoint(dir_b)
    try:
        names_a, names_b = sorted(a.keys()), sorted(b.keys())
        only_a, only_b = sorted(set(names_a) - set(names_b)), sorted(set(names_b) - set(names_a))
        _check(not only_a and not only_b,
               f"tensor names differ: only in {dir_a.name}: {only_a[:5]}, only in {dir_b.name}: {only_b[:5]}")
        for name in names_a:
            x, y = a.get(name), b.get(name)
            _check(x.dtype == y.dtype and x.shape == y.shape,
                   f"{name}: {x.dtype}{list(x.shape)} became {y.dtype}{list(y.shape)}")
            _check(x.tobytes() == y.tobytes(), f"{name}: tensor bytes differ after the round trip")
        return len(names_a)
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run_demo(cfg: ml_collections.ConfigDict | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every step, print the summary table, return the results. Raises on any failed check."""
    import jax

    cfg = default_config() if cfg is None else cfg
    with jax.default_matmul_precision(cfg.matmul_precision):
        return _run(cfg, log)


def _run(cfg: ml_collections.ConfigDict, log: Callable[[str], None]) -> dict:
    import jax
    from flax import nnx

    from apriel_jax.checkpoint.hf_export import export_hf
    from apriel_jax.checkpoint.pretrained import from_pretrained, hf_to_orbax, orbax_to_hf
    from apriel_jax.data.hf_inputs import from_hf_inputs
    from apriel_jax.data.images import ImageConfig, preprocess_image
    from apriel_jax.data.prompt import encode_prompt, prompt_batch
    from apriel_jax.data.tokenizer import train_tiny_tokenizer
    from apriel_jax.model import create_model, param_count
    from apriel_jax.model.generate import SamplingConfig, generate
    from apriel_jax.parallel.mesh import make_mesh

    out_dir = Path(cfg.out_dir)
    tok_dir, hf_dir = out_dir / "tokenizer", out_dir / "hf"
    orbax_dir, hf2_dir = out_dir / "orbax", out_dir / "hf_roundtrip"
    model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
    steps = _Steps(log)
    results: dict = {"out_dir": str(out_dir), "devices": jax.device_count(), "backend": jax.default_backend()}
    log(f"apriel-jax demo: {model_cfg.decoder.num_layers}-layer decoder, {model_cfg.vision.num_layers}-layer vision, {jax.device_count()} {jax.default_backend()} device(s), "
        f"writing to {out_dir}")

    # (a) A real tokenizer, trained here, with Pixtral's special ids.
    def make_tokenizer():
        tok_dir.mkdir(parents=True, exist_ok=True)
        tok = train_tiny_tokenizer(BUILTIN_TEXT.splitlines(), model_cfg.decoder.vocab_size, tok_dir)
        _check(tok.image_id == model_cfg.image_token_id,
               f"tokenizer [IMG]={tok.image_id} but the model expects image_token_id={model_cfg.image_token_id}")
        _check(tok.decode(tok.encode(cfg.prompt)) == cfg.prompt, "tokenizer encode/decode round trip failed")
        ids = {s: tok.special_id(s) for s in ("<s>", "</s>", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]")}
        return f"byte-level BPE, vocab {tok.vocab_size}, " + " ".join(f"{k}={v}" for k, v in ids.items()), tok

    tok = steps.run("tokenizer", make_tokenizer)

    # (b) The model, created directly in its shards.
    def make_model():
        mesh = make_mesh({k: int(v) for k, v in cfg.mesh.items()})
        model = create_model(model_cfg, seed=cfg.seed, mesh=mesh)
        jax.block_until_ready(nnx.state(model))
        shape = {k: v for k, v in mesh.shape.items() if v > 1} or {"single device": 1}
        return f"{param_count(model_cfg):,} parameters, mesh {shape}", (mesh, model)

    mesh, model = steps.run("create sharded model", make_model)

    # (c) Prompt with two images of different sizes, batch built two independent ways, forward pass.
    image_cfg = ImageConfig(longest_edge=model_cfg.vision.image_size, patch_size=model_cfg.vision.patch_size)
    images = _random_images(cfg.image_sizes, cfg.seed)

    def build_prompt():
        ids, encoded = encode_prompt([*images, cfg.prompt], tok, image_cfg)
        batch = prompt_batch([(ids, encoded)], pad_id=tok.pad_id, image_id=tok.image_id)
        hf_inputs = _hf_style_inputs(ids, [preprocess_image(im, image_cfg) for im in images])
        reference = from_hf_inputs(
            hf_inputs["input_ids"], hf_inputs.get("pixel_values"), hf_inputs.get("image_sizes"),
            image_token_id=tok.image_id, patch_size=image_cfg.patch_size, pad_id=tok.pad_id)
        for key, value in batch.items():
            _check(np.array_equal(value, reference[key]), f"prompt_batch and from_hf_inputs disagree on {key!r}")
        grids = " + ".join(f"{p[:, 0].max() + 1}x{p[:, 1].max() + 1}" for _, p in encoded)
        return (f"{len(ids)} tokens, {batch['patches'].shape[1]} patches "
                f"({grids + ' grids' if grids else 'no images'}); "
                f"matches from_hf_inputs"), (ids, batch, hf_inputs)

    ids, batch, hf_inputs = steps.run("build prompt", build_prompt)

    def first_forward():
        logits = forward_logits(model, batch)
        _check(bool(np.isfinite(logits).all()), "logits contain NaN or Inf")
        return f"logits {list(logits.shape)} (includes compilation)", logits

    logits = steps.run("forward pass (compile)", first_forward)

    def second_forward():
        again = forward_logits(model, batch)
        _check(np.array_equal(again, logits), "two forward passes on the same batch differ")
        return "same logits, compiled", None

    steps.run("forward pass (steady)", second_forward)

    # (d) HF export + re-import must reproduce the logits exactly.
    def export_and_reimport():
        token_ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        export_hf(nnx.state(model), model_cfg, hf_dir, source_dir=tok_dir, token_ids=token_ids, overwrite=True)
        reloaded = from_pretrained(hf_dir, mesh=mesh)
        again = forward_logits(reloaded, batch)
        _check(np.array_equal(again, logits),
               f"logits after HF export/import differ (max abs {np.abs(again - logits).max():.3g})")
        _check((hf_dir / "tokenizer.json").is_file(), "tokenizer.json missing from the HF export")
        size = sum(f.stat().st_size for f in hf_dir.iterdir())
        return f"{hf_dir} ({size / 1e6:.1f} MB); re-imported logits identical", None

    steps.run("HF export + re-import", export_and_reimport)

    # (e) HF -> orbax -> HF must not change a bit.
    def roundtrip():
        hf_to_orbax(hf_dir, orbax_dir, overwrite=True)
        orbax_to_hf(orbax_dir, hf2_dir, overwrite=True)
        count = _same_tensors(hf_dir, hf2_dir)
        for name in ("config.json", "tokenizer.json"):
            _check((hf_dir / name).read_bytes() == (hf2_dir / name).read_bytes(), f"{name} changed in the round trip")
        return f"{count} tensors bit-identical; config.json, tokenizer.json unchanged", None

    steps.run("HF -> orbax -> HF", roundtrip)

    # (f) The export must load in transformers and agree with our logits.
    def transformers_parity():
        if not cfg.check_transformers:
            return "skipped (check_transformers=false)", None
        try:
            import torch
            from transformers import LlavaForConditionalGeneration
        except ImportError as e:
            return f"skipped ({e.name or 'transformers/torch'} not installed)", None
        with _quiet_transformers():
            ref_model = LlavaForConditionalGeneration.from_pretrained(
                str(hf_dir), attn_implementation="eager", dtype=torch.float32)
        ref_model.eval()
        with torch.no_grad():
            out = ref_model(**{k: torch.as_tensor(v) for k, v in hf_inputs.items()}, use_cache=False)
        ref = out.logits.float().numpy()
        _check(ref.shape == logits.shape, f"transformers logits {ref.shape} vs ours {logits.shape}")
        rel = float(np.abs(ref - logits).max() / max(np.abs(ref).max(), 1e-30))
        _check(rel <= cfg.transformers_rtol,
               f"max relative logits error vs transformers {rel:.3g} > {cfg.transformers_rtol}")
        same_argmax = float((ref.argmax(-1) == logits.argmax(-1)).mean())
        return f"max relative error {rel:.2e}, argmax agreement {same_argmax:.0%}", rel

    results["transformers_max_rel_error"] = steps.run("transformers parity", transformers_parity)

    # (g) Greedy generation with the KV cache, checked against teacher-forced full forward passes.
    def greedy_generate():
        sampling = SamplingConfig(max_new_tokens=int(cfg.max_new_tokens), temperature=0.0,
                                  stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
        new, finished = generate(model, batch, sampling, rng=jax.random.key(cfg.seed))
        new = np.asarray(new)[0].tolist()
        n = new.index(tok.eos_id) + 1 if tok.eos_id in new else len(new)
        new = new[:n]
        _check_against_full_forward(model, batch, new)
        text = tok.decode(new)
        stopped = ", stopped at </s>" if bool(finished[0]) else ""
        return f"{n} tokens (KV cache == full forward){stopped}: {text!r}", (new, text)

    new_ids, text = steps.run("greedy generate", greedy_generate)

    log("")
    log(steps.table())
    results.update(
        prompt_ids=ids, generated_ids=new_ids, generated_text=text, logits_shape=list(logits.shape),
        hf_dir=str(hf_dir), orbax_dir=str(orbax_dir), tokenizer=str(tok_dir / "tokenizer.json"),
        steps=[{"step": n, "result": r, "seconds": round(s, 4)} for n, r, s in steps.rows],
        total_seconds=round(sum(s for _, _, s in steps.rows), 3),
    )
    (out_dir / "summary.json").write_text(json.dumps(results, indent=2))
    log(f"all checks passed; results in {out_dir / 'summary.json'}")
    return results


def _check_against_full_forward(model, batch: dict, new_ids: list[int]) -> None:
    """Each greedy token must be the argmax of a full (cache-free) forward pass over prompt + tokens so
    far. A disagreement is accepted only at a near-tie of the top two logits (then the runs diverge)."""
    if len(new_ids) < 2:
        return
    s = batch["tokens"].shape[1]
    ext = dict(batch)
    extra = np.asarray(new_ids[:-1], np.int32)[None]
    ext["tokens"] = np.concatenate([batch["tokens"], extra], axis=1)
    ext["segment_ids"] = np.concatenate([batch["segment_ids"], np.ones_like(extra)], axis=1)
    last = batch["positions"][0, -1]
    ext["positions"] = np.concatenate([batch["positions"], last + 1 + np.arange(extra.shape[1])[None]], axis=1)
    # Padding patches point one past the end; the end moved.
    ext["patch_token_index"] = np.where(batch["patch_segment_ids"] == 0, ext["tokens"].shape[1],
                                        batch["patch_token_index"]).astype(np.int32)
    logits = forward_logits(model, ext)[0, s - 1:]
    for i, token in enumerate(new_ids):
        row = logits[i]
        if token == int(row.argmax()):
            continue
        top2 = np.sort(row)[-2:]
        if top2[1] - top2[0] <= 1e-3 * max(abs(top2[1]), 1.0):
            return  # near-tie: cached and uncached arithmetic may legitimately pick differently
        raise DemoCheckFailed(f"generated token {i} is {token}, but a full forward pass picks {int(row.argmax())} "
                              f"(logit margin {top2[1] - top2[0]:.3g})")

