"""Checkpoint save and restore throughput on a GCS API server (the tests' emulator) against local disk.

Builds one random model of about --mb megabytes (fp32) and times, for a local directory (the baseline)
and for ``gs://`` on ``tests/gcs_server.py`` (started here, on loopback, in its own process):

  orbax save        apriel_jax.checkpoint.orbax_io.save_model (extra files, orbax/OCDBT params, marker)
  orbax restore     orbax_io.load_state onto the default device
  hf export         hf_export.export_hf (safetensors shards of --shard-mb, index, config.json last)
  hf load (cold)    pretrained.load_config_and_state: for gs://, staging into an empty local cache
                    (download, size + CRC32C check) and then the memory-mapped import
  hf load (warm)    the same again: for gs://, the cache is re-verified against the objects' metadata

and prints seconds and MB/s of model bytes per step, best of --repeat, with the ratio gs:// / local.
The emulator is single-threaded Python serving from memory on the same host: its figures measure our
client path and request count, not Cloud Storage's bandwidth.

    python benchmarks/checkpoint_storage.py --mb 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gcs_server import start as start_server  # noqa: E402  (a GCS API server on loopback)
BUCKET = "bench"



def bench_config(mb: float):
    """A decoder-heavy model whose fp32 parameters are just over ``mb`` MB."""
    from apriel_jax.model import get_preset, param_count

    cfg = get_preset("tiny")
    cfg.decoder.update(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_heads=8, num_kv_heads=4,
                       head_dim=128)
    layers = 1
    while True:
        cfg.decoder.num_layers = layers
        if param_count(cfg) * 4 >= mb * 1e6:
            return cfg
        layers += 1


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(root: str, state, cfg, shard_bytes: int, repeat: int, cache: str) -> dict[str, float]:
    """Best seconds per step with every checkpoint under ``root`` (a local directory or gs:// prefix)."""
    import jax

    from apriel_jax.checkpoint import hf_export, orbax_io, pretrained

    best: dict[str, float] = {}

    def record(step, seconds):
        best[step] = min(best.get(step, float("inf")), seconds)

    for i in range(repeat):
        orbax_dir, hf_dir = f"{root}/orbax-{i}", f"{root}/hf-{i}"
        record("orbax save", timed(lambda: orbax_io.save_model(state, cfg, orbax_dir)))
        record("orbax restore", timed(lambda: jax.block_until_ready(orbax_io.load_state(orbax_dir, cfg))))
        record("hf export", timed(lambda: hf_export.export_hf(state, cfg, hf_dir, max_shard_bytes=shard_bytes)))
        shutil.rmtree(cache, ignore_errors=True)
        for step in ("hf load (cold)", "hf load (warm)"):
            record(step, timed(lambda: jax.block_until_ready(pretrained.load_config_and_state(hf_dir)[1])))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=256, help="model size (fp32 MB)")
    parser.add_argument("--shard-mb", type=float, default=64, help="safetensors shard size of the HF export")
    parser.add_argument("--repeat", type=int, default=2, help="runs per step; the best is reported")
    args = parser.parse_args()

    server, url = start_server(BUCKET)
    workdir = Path(tempfile.mkdtemp(prefix="apriel-ckpt-storage-"))
    # Before apriel_jax.storage is used: every GCS client of this process goes to the emulator, and
    # staged copies go to a cache this benchmark empties for each cold load.
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["APRIEL_CACHE_DIR"] = str(workdir / "cache")
    try:
        from flax import nnx

        from apriel_jax.model import create_model, param_count

        cfg = bench_config(args.mb)
        state = nnx.state(create_model(cfg, seed=0))
        size = param_count(cfg) * 4
        print(f"model {size / 1e6:.0f} MB fp32 ({cfg.decoder.num_layers} decoder layers), HF shards of "
              f"{args.shard_mb:.0f} MB, best of {args.repeat}; emulator at {url}")
        shard_bytes = int(args.shard_mb * 1e6)
        local = run(str(workdir / "local"), state, cfg, shard_bytes, args.repeat, str(workdir / "cache"))
        remote = run(f"gs://{BUCKET}/run", state, cfg, shard_bytes, args.repeat, str(workdir / "cache"))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'step':16} {'local s':>8} {'local MB/s':>11} {'gs:// s':>8} {'gs:// MB/s':>11} {'gs:// / local':>14}")
    for step, seconds in local.items():
        print(f"{step:16} {seconds:8.2f} {size / seconds / 1e6:11.0f} {remote[step]:8.2f} "
              f"{size / remote[step] / 1e6:11.0f} {remote[step] / seconds:13.2f}x")


if __name__ == "__main__":
    main()
