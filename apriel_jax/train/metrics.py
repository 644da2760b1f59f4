"""Where training metrics go: a JSONL log (always), TensorBoard, Weights & Biases, the console.

* ``RUN_DIR/metrics.jsonl``: one JSON object per logged step, ``{"step", "time", "split", <scalars>}``.
  It is the source of ``apriel-jax plot``. A resumed run appends; steps the interrupted run logged
  after its last checkpoint then appear twice, and readers keep the last entry of each step.
* TensorBoard event files under ``RUN_DIR/tensorboard`` through ``tensorboardX`` (no tensorflow).
  When it is not installed the run goes on without them (a warning says so).
* Weights & Biases only when enabled and ``wandb`` is importable; it is never required.
* The console line: step, loss, lr, tokens/s, MFU, step time, data wait and ETA. MFU needs the chip's
  peak, known only for accelerators (``flops.peak_flops``); elsewhere it prints "MFU n/a (<platform>)".
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

from apriel_jax.train.flops import peak_flops

JSONL_NAME = "metrics.jsonl"


def mfu(flops_per_step: float, step_time_s: float, num_chips: int, device_kind: str) -> float | None:
    """Model FLOPs utilisation, or None where the peak of the device kind is unknown."""
    peak = peak_flops(device_kind)
    if peak is None or step_time_s <= 0:
        return None
    return flops_per_step / (step_time_s * num_chips * peak)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, m: dict, *, platform: str) -> str:
    """One console line from a train-metrics dict (keys as written by the loop)."""
    util = m.get("mfu")
    util_text = f"MFU {100 * util:.1f}%" if util is not None else f"MFU n/a ({platform})"
    return (f"step {step}/{total}  loss {m['loss']:.4f}  lr {m['lr']:.3e}  "
            f"{m['tokens_per_s']:,.0f} tok/s  {util_text}  step {m['step_time_s'] * 1e3:.0f} ms  "
            f"data {m['data_wait_s'] * 1e3:.0f} ms  ETA {_duration(m['eta_s'])}")


def read_jsonl(path) -> list[dict]:
    """Entries of a metrics log, one per (split, step): the last written wins (see module docstring)."""
    latest: dict[tuple[str, int], dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                latest[(entry.get("split", "train"), int(entry["step"]))] = entry
    return [latest[k] for k in sorted(latest, key=lambda k: (k[0], k[1]))]


class MetricsWriter:
    """Fans scalars out to the JSONL log, TensorBoard and (optionally) W&B; prints progress lines."""

    def __init__(self, run_dir, *, tensorboard: bool = True, wandb: bool = False, wandb_project: str = "apriel-jax",
                 console: bool = True, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / JSONL_NAME
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self.console = console
        self._tb = self._open_tensorboard() if tensorboard else None
        self._wandb = self._open_wandb(wandb_project, config) if wandb else None

    def _open_tensorboard(self):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            warnings.warn("tensorboardX is not installed: no TensorBoard event files (metrics.jsonl is written)")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"), flush_secs=10)

    def _open_wandb(self, project: str, config: dict | None):
        try:
            import wandb
        except ImportError:
            warnings.warn("log.wandb is on but wandb is not installed: not logging to Weights & Biases")
            return None
        return wandb.init(project=project, dir=str(self.run_dir), config=config, resume="allow")

    def write(self, step: int, scalars: dict, split: str = "train") -> None:
        """Record ``scalars`` (name -> number or None) of ``split`` at ``step``; Nones go to JSONL only."""
        entry = {"step": int(step), "time": time.time(), "split": split}
        entry.update({k: (None if v is None else float(v)) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(entry) + "\n")
        self._jsonl.flush()  # the plot command and tests read the log while the run goes on
        numbers = {f"{split}/{k}": float(v) for k, v in scalars.items() if v is not None}
        if self._tb is not None:
            for tag, value in numbers.items():
                self._tb.add_scalar(tag, value, int(step))
        if self._wandb is not None:
            self._wandb.log(numbers, step=int(step))

    def print(self, text: str) -> None:
        if self.console:
            print(text, file=sys.stdout, flush=True)

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
