"""Where training metrics go: a JSONL log (always), TensorBoard, Weights & Biases, the console.

* ``RUN_DIR/metrics.jsonl``: one JSON object per logged step, ``{"step", "time", "split", <scalars>}``.
  It is the source of ``apriel-jax plot``. A resumed run appends; steps the interrupted run logged
  after its last checkpoint then appear twice, and readers keep the last entry of each step.
* TensorBoard event files under ``RUN_DIR/tensorboard``, written with ``tensorboardX``'s event-file
  writer (no tensorflow). When it is not installed the run goes on without them (a warning says so).
* Weights & Biases only when enabled and ``wandb`` is importable; it is never required.
* The console line: step, loss, lr, tokens/s, MFU, step time, data wait and ETA. MFU needs the chip's
  peak, known only for accelerators (``flops.peak_flops``); elsewhere it prints "MFU n/a (<platform>)".

``RUN_DIR`` may be local or ``gs://``. Locally every line reaches the file at once (the plot command
and tests read the log while the run goes on). In a bucket, where objects cannot be appended to, the
log and the event files are written to a local spool and uploaded whole (``storage.AppendLog``,
``storage.SpooledDirectory``; tensorboardX's own GCS writer does not work with the pinned versions):
every ``remote_flush_s`` seconds, and always on :meth:`MetricsWriter.flush` (the training loop calls it
whenever it saves a checkpoint) and at close, so the bucket's log covers every step up to the last
checkpoint. A timed upload that fails is retried at the next one; a failing :meth:`~MetricsWriter.flush`
or close raises ``storage.StorageError``. W&B keeps its files in a local directory (a temporary one for
a ``gs://`` run directory) and sends them to its own server.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import warnings

from apriel_jax import storage
from apriel_jax.train.flops import peak_flops

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Seconds between uploads of the logs of a gs:// run directory (each upload replaces whole objects).
REMOTE_FLUSH_S = 30.0


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
    """Entries of a metrics log (local or ``gs://``), one per (split, step): the last written wins (see
    module docstring)."""
    latest: dict[tuple[str, int], dict] = {}
    for line in storage.read_text(path).splitlines():
        if line.strip():
            entry = json.loads(line)
            latest[(entry.get("split", "train"), int(entry["step"]))] = entry
    return [latest[k] for k in sorted(latest, key=lambda k: (k[0], k[1]))]


class _EventFile:
    """Scalars as a TensorBoard event file in ``directory`` (local or ``gs://``, through a spool).

    Written synchronously with tensorboardX's ``EventsWriter`` rather than its ``SummaryWriter``: that one
    hands events to a background thread whose queue its ``flush()`` does not wait for, so an upload right
    after a flush could miss the latest steps.
    """

    def __init__(self, directory):
        from tensorboardX.event_file_writer import EventsWriter

        self._dir = storage.SpooledDirectory(directory)
        self._events = EventsWriter(os.path.join(self._dir.local_dir, "events"))

    def add_scalars(self, numbers: dict[str, float], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        for tag, value in numbers.items():
            self._events.write_event(Event(wall_time=now, step=step, summary=scalar(tag, value)))

    def flush(self) -> None:
        """Write buffered events to the file, then upload it (remote)."""
        self._events.flush()
        self._dir.sync()

    def close(self) -> None:
        try:
            self._events.close()
        finally:
            self._dir.close()


class MetricsWriter:
    """Fans scalars out to the JSONL log, TensorBoard and (optionally) W&B; prints progress lines."""

    def __init__(self, run_dir, *, tensorboard: bool = True, wandb: bool = False, wandb_project: str = "apriel-jax",
                 console: bool = True, config: dict | None = None, remote_flush_s: float = REMOTE_FLUSH_S):
        self.run_dir = storage.location(run_dir)
        self.remote = storage.is_remote(self.run_dir)
        self.remote_flush_s = remote_flush_s
        self.console = console
        # Timed uploads are this writer's: the log and the event files go up together.
        self._jsonl = storage.AppendLog(self.run_dir / JSONL_NAME, upload_every_s=float("inf"))
        self._last_upload = time.monotonic()
        self._upload_failing = False
        self._tb = self._open_tensorboard() if tensorboard else None
        self._wandb_tmp = None
        self._wandb = self._open_wandb(wandb_project, config) if wandb else None

    def _open_tensorboard(self) -> _EventFile | None:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            warnings.warn("tensorboardX is not installed: no TensorBoard event files (metrics.jsonl is written)")
            return None
        return _EventFile(self.run_dir / TENSORBOARD_DIR)

    def _open_wandb(self, project: str, config: dict | None):
        try:
            import wandb
        except ImportError:
            warnings.warn("log.wandb is on but wandb is not installed: not logging to Weights & Biases")
            return None
        if self.remote:  # wandb writes its files with plain file I/O, then syncs them to its server
            self._wandb_tmp = tempfile.mkdtemp(prefix="apriel-wandb-")
        return wandb.init(project=project, dir=self._wandb_tmp or str(self.run_dir), config=config, resume="allow")

    def write(self, step: int, scalars: dict, split: str = "train") -> None:
        """Record ``scalars`` (name -> number or None) of ``split`` at ``step``; Nones go to JSONL only."""
        entry = {"step": int(step), "time": time.time(), "split": split}
        entry.update({k: (None if v is None else float(v)) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(entry))
        numbers = {f"{split}/{k}": float(v) for k, v in scalars.items() if v is not None}
        if self._tb is not None:
            self._tb.add_scalars(numbers, int(step))
            if not self.remote:  # local readers (tensorboard, tests) follow the file live, as the log's
                self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=int(step))
        if self.remote and time.monotonic() - self._last_upload >= self.remote_flush_s:
            self._timed_upload()

    def _timed_upload(self) -> None:
        """A failed upload must not stop training between checkpoints: the spool keeps everything, and
        the next upload (at the latest the forced one of the next checkpoint) sends it again."""
        try:
            self.flush()
        except storage.StorageError as err:
            if not self._upload_failing:
                print(f"warning: metrics upload failed, retrying at the next one: {err}", file=sys.stderr,
                      flush=True)
            self._upload_failing = True
            self._last_upload = time.monotonic()

    def print(self, text: str) -> None:
        if self.console:
            print(text, file=sys.stdout, flush=True)

    def flush(self) -> None:
        """Write everything out; for a ``gs://`` run directory upload the log and event files now."""
        if self._tb is not None:
            self._tb.flush()
        self._jsonl.flush(force=True)
        self._last_upload, self._upload_failing = time.monotonic(), False

    def close(self) -> None:
        """Close every sink (each one even when another fails), then raise the first failure."""
        closers = [self._jsonl.close]
        if self._tb is not None:
            closers.append(self._tb.close)
        if self._wandb is not None:
            closers.append(self._wandb.finish)
        first = None
        for close in closers:
            try:
                close()
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other sinks are closed
                first = first or err
        if self._wandb_tmp is not None:
            shutil.rmtree(self._wandb_tmp, ignore_errors=True)
        if first is not None:
            raise first
