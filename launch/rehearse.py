"""Dress rehearsal of the 15B pod job on this machine, before paying for the pod.

Runs ``configs/pipelines/apriel_15b.py`` itself (every stage: upscale with its layer map and a 6-checkpoint
average, realign, CPT-1 with a 3-checkpoint average, CPT-2 on the synthetic tasks, the three SFT runs, the
merge, the Hugging Face export) the way the pod runs it: the same ``apriel-jax pipeline`` command in N local
CPU processes joined by ``jax.distributed``. Only command-line overrides change it (:func:`overrides`): the
tiny preset's widths and layers (the vocabulary stays Tekken's, since the data is tokenized with the real
tokenizer), a few steps per stage, short sequences and small patch budgets, one row per process, and no
data-loader workers. Its data root holds the folders the config names, made by ``apriel-jax data prepare``
from the demo data that ships with the package; its base checkpoint is a random tiny model in the HF layout
(the real one is Pixtral-12B). A change to the config that needs more than overrides to run breaks here.

    python launch/rehearse.py --out /tmp/rehearsal                  # 4 processes x 1 CPU device
    python launch/rehearse.py --out /tmp/rehearsal --run-dir gs://BUCKET/rehearsal --data-root gs://BUCKET/data

Unlike the other launchers this one needs apriel-jax installed (it runs the job here). Exit code: the
first non-zero exit code of the processes (those of ``apriel-jax pipeline``), else 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pipelines" / "apriel_15b.py"
# Data folders the config reads under its data root, and the shipped demo file each is prepared from.
DATA = {"text": "text.jsonl", "replay": "text.jsonl", "multimodal": "multimodal.jsonl", "sft": "chat_sft.jsonl",
        "sft_stratified_25pct": "chat_sft.jsonl", "sft_long_32k_49k": "chat_sft.jsonl",
        "sft_le_32k": "chat_sft.jsonl"}
# Steps per stage: enough checkpoints for the averages the config asks for (6 for upscale, 3 for CPT-1).
STEPS = {"upscale": 6, "realign": 2, "cpt1": 3, "cpt2": 2, "sft_main": 2, "sft_subset": 2, "sft_long": 2}
SEQ_LEN = 256
UPSCALED_LAYERS = 3  # the tiny preset's 2 decoder layers grown as 40 -> 48 grows Pixtral's
PATCH_BUDGET = 160  # with its [IMG_BREAK] tokens an image must fit one 256-token row


def tiny_model_overrides() -> list[str]:
    """The tiny preset's widths, heads and layers in place of Pixtral-12B's (the vocabulary is kept)."""
    from apriel_jax.model import get_preset

    tiny = get_preset("tiny")
    keys = {"vision": ("hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"),
            "decoder": ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")}
    return [f"--config.model.{part}.{key}={tiny[part][key]}" for part, names in keys.items() for key in names]


def overrides(processes: int, base: str, run_dir: str) -> list[str]:
    """Every override of the rehearsal: nothing else differs from the production config."""
    out = [f"--config.base={base}", f"--config.run_dir={run_dir}", "--config.export.check_with_transformers=true",
           f"--config.stages.upscale.transform.num_layers={UPSCALED_LAYERS}", *tiny_model_overrides()]
    for name, steps in STEPS.items():
        prefix = f"--config.stages.{name}"
        out += [f"{prefix}.tokens={steps * processes * SEQ_LEN}", f"{prefix}.train.data.seq_len={SEQ_LEN}",
                f"{prefix}.train.data.global_batch={processes}", f"{prefix}.train.data.worker_count=0",
                f"{prefix}.train.chunk_size={SEQ_LEN}", f"{prefix}.train.checkpoint.save_every=1",
                f"{prefix}.train.eval.every={steps}", f"{prefix}.train.eval.batches=1",
                f"{prefix}.train.log.tensorboard=false"]
        if name in ("realign", "cpt1", "cpt2"):
            out.append(f"{prefix}.train.data.patch_budget={PATCH_BUDGET}")
    return out


def prepare_data(root: str) -> None:
    """Each folder the config reads, made by ``apriel-jax data prepare`` (kept when already complete)."""
    from apriel_jax import storage
    from apriel_jax.cli import main

    demo = REPO / "apriel_jax" / "data" / "demo_data"
    for name, file in DATA.items():
        out = storage.location(root) / name
        if (out / "manifest.json").exists():
            continue
        if main(["data", "prepare", str(demo / file), "--out", str(out), "--overwrite", "--strict"]) != 0:
            raise SystemExit(f"rehearse: data prepare {file} -> {out} failed")


def make_base(path: str) -> None:
    """A random tiny model with Tekken's vocabulary in the HF layout: the stand-in for Pixtral-12B."""
    from flax import nnx

    from apriel_jax import storage
    from apriel_jax.checkpoint.hf_export import export_hf
    from apriel_jax.model import create_model, get_preset

    if (storage.location(path) / "config.json").exists():
        return
    cfg = get_preset("tiny")
    cfg.decoder.vocab_size = get_preset("pixtral_12b").decoder.vocab_size
    export_hf(nnx.state(create_model(cfg, seed=0)), cfg, path, overwrite=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(argv: list[str], processes: int, devices: int, log_dir: Path) -> list[int]:
    """``argv`` in ``processes`` local processes of ``devices`` CPU devices each; their exit codes."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port, procs = _free_port(), []
    for pid in range(processes):
        env = {k: v for k, v in os.environ.items() if not k.startswith("APRIEL_")}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   APRIEL_COORDINATOR_ADDRESS=f"localhost:{port}", APRIEL_NUM_PROCESSES=str(processes),
                   APRIEL_PROCESS_ID=str(pid), PYTHONUNBUFFERED="1")
        with open(log_dir / f"process_{pid}.log", "w") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    return [p.wait() for p in procs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Logs: OUT/logs/process_N.log; the pipeline's summary is in process 0's.")
    p.add_argument("--out", required=True, help="local working directory (logs; run, data and base by default)")
    p.add_argument("--processes", type=int, default=4, help="local processes (default 4)")
    p.add_argument("--devices-per-process", type=int, default=1, help="CPU devices of each process (default 1)")
    p.add_argument("--run-dir", help="the pipeline's run directory, local or gs:// (default OUT/run)")
    p.add_argument("--data-root", help="where the prepared data goes, local or gs:// (default OUT/data)")
    p.add_argument("--print-overrides", action="store_true", help="print the overrides and exit")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process builds the base on the CPU, like the job
    out = Path(args.out).absolute()
    run_dir, data_root = args.run_dir or str(out / "run"), args.data_root or str(out / "data")
    base = str(out / "base")
    flags = overrides(args.processes, base, run_dir)
    if args.print_overrides:
        print("\n".join(flags))
        return 0
    t0 = time.time()
    prepare_data(data_root)
    make_base(base)
    print(f"rehearse: data in {data_root}, base in {base} ({time.time() - t0:.0f} s)", flush=True)
    cmd = [sys.executable, "-m", "apriel_jax.cli", "pipeline", f"{CONFIG}:{data_root}", *flags]
    codes = launch(cmd, args.processes, args.devices_per_process, out / "logs")
    print(f"rehearse: {args.processes} processes exited {codes} after {time.time() - t0:.0f} s; logs in "
          f"{out / 'logs'}", flush=True)
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
