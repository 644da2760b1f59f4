"""Training runs and the stage runner with their run directory in a bucket (tests/gcs_server.py: a GCS API
server on loopback, no mocks).

* A tiny ``apriel-jax train`` run on ``gs://`` killed with SIGKILL after its first checkpoint, given a
  half-written later checkpoint (what a kill in the middle of a save leaves on GCS), and rerun: it resumes
  from the committed checkpoint and ends bit-identical to an uninterrupted local run. Its metrics.jsonl
  on the bucket covers every step, its TensorBoard event files parse, ``apriel-jax plot gs://…`` writes
  the PNG to the bucket.
* The checkpoint bucket disappearing mid-run stops the run with exit code 74 and one line naming it.
* The shrunk demo pipeline with its run directory and export in the bucket; the export, downloaded,
  loads in transformers with our logits.
* Nothing is ever written to a local ``./gs:`` folder.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from apriel_jax import storage
from apriel_jax.storage import gcs
from apriel_jax.train.loop import load_params, train
from apriel_jax.train.metrics import read_jsonl
from apriel_jax.utils.config_cli import apply_overrides, load_config_file
from conftest import GCS_BUCKET
from test_train_loop import read_event_scalars

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train" / "tiny_text.py"
STEPS = 8
# What determines the parameters, shared by the local reference and the runs in the bucket.
COMMON = [f"--config.steps={STEPS}", "--config.checkpoint.save_every=3", "--config.eval.every=0"]
TIMEOUT_S = 300


def make_cfg(run_dir, *overrides):
    return apply_overrides(load_config_file(str(CONFIG)), [*COMMON, f"--config.run_dir={run_dir}", *overrides])


class TrainProcess:
    """``apriel-jax train`` in a subprocess; its output goes to files (a pipe nobody reads while the test
    polls the bucket could fill up and stall the run)."""

    def __init__(self, run_dir, cwd, *overrides):
        cmd = [sys.executable, "-m", "apriel_jax.cli", "train", str(CONFIG), *COMMON, f"--config.run_dir={run_dir}",
               *overrides]
        name = f"train-{uuid.uuid4().hex[:6]}"
        self.out_path, self.err_path = Path(cwd) / f"{name}.out", Path(cwd) / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, text=True)

    def outputs(self) -> tuple[str, str]:
        return self.out_path.read_text(), self.err_path.read_text()

    def wait(self, timeout=TIMEOUT_S) -> tuple[int, str, str]:
        self.proc.wait(timeout=timeout)
        return (self.proc.returncode, *self.outputs())

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # killed if the test fails before the run ends
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for_object(run: TrainProcess, url, timeout=TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not storage.location(url).exists():
        if run.proc.poll() is not None:
            out, err = run.outputs()
            pytest.fail(f"run exited ({run.proc.returncode}) before {url} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not appear within {timeout}s")
        time.sleep(0.2)


def committed_steps(ckpt_url) -> list[int]:
    """Steps whose orbax commit object (written last on GCS) is in the bucket."""
    return sorted(int(p.name) for p in storage.location(ckpt_url).iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


def copy_prefix(src_url, dst_url, skip: str) -> None:
    fs = gcs.filesystem()
    src = src_url[len("gs://"):]
    for key in fs.find(src):
        if key.split("/")[-1] != skip or os.path.dirname(key) != src:
            fs.copy(key, dst_url[len("gs://"):] + key[len(src):])


def delete_bucket(name: str) -> None:
    """Delete a bucket with its objects. Deleting the bucket answers 409 while an object is left, e.g. one
    whose upload the stopped run had in flight: list and delete again."""
    from gcsfs.retry import HttpError

    fs = gcs.filesystem()
    deadline = time.monotonic() + 60  # the server may first wait out the stopped run's open request
    while time.monotonic() < deadline:
        fs.invalidate_cache()  # a listing cached before the stopped run's last upload landed would miss it
        try:
            fs.rm(name, recursive=True)
            return
        except HttpError as err:
            if err.code != 409:
                raise
            time.sleep(0.5)
    pytest.fail(f"bucket {name} still holds {fs.find(name)[:5]}")


def assert_nothing_local(*dirs) -> None:
    for d in (REPO, *dirs):
        assert not (Path(d) / "gs:").exists(), f"a local gs: folder appeared in {d}"


@pytest.fixture(scope="module")
def gcs_prefix(gcs_server):
    return f"gs://{GCS_BUCKET}/test_storage_train-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local_reference")
    cfg = make_cfg(run_dir, "--config.log.console=false")
    assert train(cfg)["status"] == "completed"
    return cfg


@pytest.fixture(scope="module")
def resumed_run(gcs_prefix, tmp_path_factory):
    """A run in the bucket: killed after its first checkpoint, left a half-written later one, rerun."""
    cwd = tmp_path_factory.mktemp("cwd")
    run, ckpt = f"{gcs_prefix}/run", f"{gcs_prefix}/run/checkpoints"
    with TrainProcess(run, cwd, "--config.debug.step_sleep_s=0.4") as killed:
        wait_for_object(killed, f"{ckpt}/3/commit_success.txt")
        killed.proc.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    saved = committed_steps(ckpt)
    assert saved and max(saved) < STEPS, f"killed too late: checkpoints {saved}"
    # What a kill in the middle of saving step 6 leaves on GCS (no rename there): every object of the step
    # but its commit object. Its content is step 3's, so restoring it would show in the final parameters.
    copy_prefix(f"{ckpt}/{max(saved)}", f"{ckpt}/6", skip="commit_success.txt")
    with TrainProcess(run, cwd) as resumed:
        rc, out, err = resumed.wait()
    assert rc == 0, out + err
    assert_nothing_local(cwd)
    return run, max(saved), out


def test_run_killed_in_a_bucket_resumes_bit_identical_to_a_local_run(local_reference, resumed_run):
    run, restart, out = resumed_run
    assert f"resumed from {run}/checkpoints at step {restart}" in out  # not from the half-written step 6
    assert committed_steps(f"{run}/checkpoints")[-1] == STEPS
    expected, got = load_params(local_reference), load_params(make_cfg(run))
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_logs_in_the_bucket_cover_every_step(resumed_run, tmp_path):
    run, _, _ = resumed_run
    entries = read_jsonl(f"{run}/metrics.jsonl")
    loss = {e["step"]: e["loss"] for e in entries if e["split"] == "train"}
    assert sorted(loss) == list(range(1, STEPS + 1))  # the killed run uploaded its log with its checkpoint
    events = storage.location(run) / "tensorboard"
    for path in events.iterdir():  # what `tensorboard --logdir gs://…` reads
        (tmp_path / path.name).write_bytes(path.read_bytes())
    scalars = read_event_scalars(tmp_path)
    assert sorted({s for s, _ in scalars["train/loss"]}) == list(range(1, STEPS + 1))
    for step, value in scalars["train/loss"]:  # steps redone after the kill logged the same values again
        np.testing.assert_allclose(value, loss[step], rtol=1e-6)
    assert {s for s, _ in scalars["train/lr"]} == set(loss)


def test_plot_reads_and_writes_the_bucket(resumed_run, tmp_path, monkeypatch):
    from apriel_jax.cli import main

    run, _, _ = resumed_run
    monkeypatch.chdir(tmp_path)
    assert main(["plot", run]) == 0
    assert storage.read_bytes(f"{run}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert_nothing_local(tmp_path)


def test_checkpoint_bucket_vanishing_mid_run_stops_with_74(gcs_root, tmp_path):
    bucket = f"apriel-doomed-{uuid.uuid4().hex[:8]}"
    gcs.filesystem().mkdir(bucket)
    ckpt = f"gs://{bucket}/checkpoints"
    with TrainProcess(f"{gcs_root}/run", tmp_path, f"--config.checkpoint.dir={ckpt}",
                      "--config.debug.step_sleep_s=0.4", "--config.log.tensorboard=false") as run:
        wait_for_object(run, f"{ckpt}/3/commit_success.txt")
        run.proc.send_signal(signal.SIGSTOP)  # no write of the run races the deletion
        try:
            delete_bucket(bucket)
            assert not gcs.bucket_exists(bucket)
        finally:
            run.proc.send_signal(signal.SIGCONT)
        rc, out, err = run.wait()
    assert rc == 74, out + err[-5000:]
    [line] = [x for x in err.splitlines() if x.startswith("stopped at step")]
    assert f"{ckpt}: bucket gs://{bucket} does not exist" in line and "rerun the same command" in line
    stopped = int(line.split()[3].rstrip(":"))
    # A failed asynchronous save shows at the next save or at the end: a run whose last save failed
    # did not complete, even when it ran every step.
    assert 3 < stopped <= STEPS
    assert f"train: io_error at step {stopped}" in out
    # The log in the run directory (another bucket) was uploaded when the run stopped.
    assert max(e["step"] for e in read_jsonl(f"{gcs_root}/run/metrics.jsonl")) == stopped
    assert_nothing_local(tmp_path)
