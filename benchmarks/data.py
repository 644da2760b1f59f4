"""Data-pipeline throughput per worker against what a 15B CPT run on TPU v5p consumes per host.

Measures, in one process (no grain workers, so the numbers are per worker):

  text        packed tokens/s: JsonlSource over the shipped demo paragraphs repeated into a larger
              JSONL -> RecordToDocument (Pixtral Tekken tokenizer) -> build_dataset, rows of S=8192
  images      images/s: RecordToDocument on captioning records whose one image is an inline JPEG of a
              synthetic scene (512x384, noisy shapes), i.e. base64 decode + JPEG decode + resize +
              normalise + patchify + chat encoding

and the per-host need of a CPT-1 run of apriel_15b on TPU v5p:

  tokens/s/host = peak 459e12 FLOP/s x MFU 0.5 x 4 chips/host / (train FLOPs per token at S=32768)
  images/s/host = tokens/s/host x 30% multimodal tokens / 1024 tokens per image

    python benchmarks/data.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO = REPO / "apriel_jax" / "data" / "demo_data"
PEAK_V5P, MFU, CHIPS_PER_HOST, TRAIN_SEQ = 459e12, 0.5, 4, 32768
MM_TOKEN_SHARE, TOKENS_PER_IMAGE = 0.30, 1024


def needed_per_host() -> tuple[float, float]:
    """(tokens/s, images/s) one v5p host consumes training apriel_15b at the stated MFU."""
    from apriel_jax.model.presets import get_preset
    from apriel_jax.train.flops import train_step_flops

    flops_per_token = train_step_flops(get_preset("apriel_15b"), batch=1, seq_len=TRAIN_SEQ) / TRAIN_SEQ
    tokens = PEAK_V5P * MFU * CHIPS_PER_HOST / flops_per_token
    return tokens, tokens * MM_TOKEN_SHARE / TOKENS_PER_IMAGE


def bench_text(workdir: Path, seconds: float) -> float:
    """Packed real tokens per second through the full pipeline (0 workers)."""
    from apriel_jax.data.packing import PackingConfig
    from apriel_jax.data.pipeline import build_dataset
    from apriel_jax.data.records import RecordToDocument
    from apriel_jax.data.sources import JsonlSource

    paragraphs = [json.loads(line)["text"] for line in (DEMO / "text.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    path = workdir / "text.jsonl"
    with open(path, "w") as fh:  # documents of 1-12 paragraphs: varied lengths, like real web text
        for _ in range(4000):
            picks = rng.choice(len(paragraphs), size=int(rng.integers(1, 13)))
            fh.write(json.dumps({"text": "\n\n".join(paragraphs[i] for i in picks)}) + "\n")
    conv = RecordToDocument("pixtral", loss="all")
    cfg = PackingConfig(seq_len=8192, patch_budget=0, pad_id=conv.tokenizer.pad_id)
    it = iter(build_dataset({"text": (JsonlSource(path), 1.0)}, conv, cfg, global_batch=4, seed=0))
    next(it)  # warm-up (tokenizer already loaded above)
    start, tokens = time.perf_counter(), it.stats.packing.tokens
    while time.perf_counter() - start < seconds:
        next(it)
    return (it.stats.packing.tokens - tokens) / (time.perf_counter() - start)


def scene_jpeg(rng: np.random.Generator) -> bytes:
    from apriel_jax.data.synthetic import render_scene

    image, _ = render_scene(rng, size=(384, 512), num_objects=(3, 8), noise=0.08)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bench_images(seconds: float) -> tuple[float, int]:
    """Images per second converted by RecordToDocument, and the patches per image."""
    from apriel_jax.data.records import RecordToDocument

    rng = np.random.default_rng(0)
    records = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image_base64": base64.b64encode(scene_jpeg(rng)).decode()},
                                     {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": "Several coloured shapes on a plain background."}]} for _ in range(32)]
    conv = RecordToDocument("pixtral", image_cfg=_image_cfg(), patch_budget=4096)
    patches = conv(records[0]).num_patches  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        conv(records[n % len(records)])
        n += 1
    return n / (time.perf_counter() - start), patches


def _image_cfg():
    from apriel_jax.data.images import ImageConfig

    return ImageConfig(longest_edge=1024)  # 512x384 stays native: 32x24 = 768 patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per benchmark (default: 10)")
    args = parser.parse_args()
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    need_tokens, need_images = needed_per_host()
    with tempfile.TemporaryDirectory() as tmp:
        tokens = bench_text(Path(tmp), args.seconds)
    images, patches = bench_images(args.seconds)

    print(f"host: {os.cpu_count()} CPUs; rates are for ONE worker (0 grain workers, main process)")
    print(f"need: apriel_15b CPT-1 on TPU v5p, {PEAK_V5P / 1e12:.0f} TFLOP/s/chip x {MFU:.0%} MFU x "
          f"{CHIPS_PER_HOST} chips/host, S={TRAIN_SEQ}")
    print(f"      images assume {MM_TOKEN_SHARE:.0%} of tokens are multimodal with ~1 image per "
          f"{TOKENS_PER_IMAGE} tokens")
    rows = [("text tokens/s (S=8192, packed)", tokens, need_tokens),
            (f"images/s (512x384 JPEG, {patches} patches)", images, need_images)]
    print(f"{'measure':<40} {'ours/worker':>12} {'need/host':>12} {'ours/need':>10} {'workers/host':>13}")
    for name, ours, need in rows:
        print(f"{name:<40} {ours:>12,.0f} {need:>12,.1f} {ours / need:>10.2f} {int(np.ceil(need / ours)):>13}")


if __name__ == "__main__":
    main()
