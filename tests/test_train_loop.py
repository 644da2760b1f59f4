"""The training loop end to end: logs, deterministic resume after SIGKILL, SIGTERM, plots, config errors.

One in-process reference run (module fixture) is shared: its logs are checked, it is plotted, and its
final parameters are what a killed-and-resumed subprocess run must reproduce bit for bit. Subprocess runs
inherit the 8 fake CPU devices from conftest's environment variables.
"""

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from apriel_jax.train.loop import load_params, train
from apriel_jax.utils.config_cli import apply_overrides, load_config_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train" / "tiny_text.py"
STEPS = 12
# Shared by the in-process reference and the subprocess runs: what determines the parameters.
COMMON = [f"--config.steps={STEPS}", "--config.checkpoint.save_every=3", "--config.checkpoint.async_save=false"]


def make_cfg(run_dir, *overrides):
    cfg = load_config_file(str(CONFIG))
    return apply_overrides(cfg, [*COMMON, f"--config.run_dir={run_dir}", *overrides])


def start_run(run_dir, *overrides):
    cmd = [sys.executable, "-m", "apriel_jax.cli", "train", str(CONFIG), *COMMON, f"--config.run_dir={run_dir}",
           "--config.log.tensorboard=false", "--config.eval.every=0", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_steps(run_dir) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(proc, run_dir, step, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while step not in logged_steps(run_dir):
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"step {step} not logged within {timeout}s")
        time.sleep(0.05)


def read_event_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from TensorBoard event files (TFRecord framing around Event protos)."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]  # 8 length + 4 length-crc, then the record
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = make_cfg(run_dir, "--config.eval.every=6", "--config.log.console=false")
    return run_dir, cfg, train(cfg)


def test_run_writes_logs_and_learns(reference):
    run_dir, _, summary = reference
    assert summary["status"] == "completed" and summary["step"] == STEPS
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_loss = [e["loss"] for e in entries if e["split"] == "train"]
    assert len(train_loss) == STEPS
    assert train_loss[-1] < train_loss[0] - 1.0  # repetitive built-in text: learned fast
    assert [e["step"] for e in entries if e["split"] == "eval"] == [6, 12]
    assert all(e["mfu"] is None for e in entries if e["split"] == "train")  # CPU: peak unknown
    scalars = read_event_scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], train_loss, rtol=1e-6)
    assert len(scalars["eval/loss"]) == 2 and "train/lr" in scalars and "train/grad_norm" in scalars


def test_resume_after_sigkill_is_bit_identical(reference, tmp_path, rng):
    _, ref_cfg, _ = reference
    run_dir = tmp_path / "killed"
    kill_at = int(rng.integers(4, 9))  # between checkpoints 3 and 9, so some steps are redone
    proc = start_run(run_dir, "--config.debug.step_sleep_s=0.4")
    wait_for_step(proc, run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < STEPS, f"killed too late: checkpoints {saved}"

    resumed = start_run(run_dir)
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    assert f"resumed from {run_dir / 'checkpoints'} at step {max(saved)}" in out

    expected, got = load_params(ref_cfg), load_params(make_cfg(run_dir))
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_sigterm_saves_and_exits(tmp_path):
    run_dir = tmp_path / "preempted"
    proc = start_run(run_dir, "--config.debug.step_sleep_s=0.4")
    wait_for_step(proc, run_dir, 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    assert "preempted (SIGTERM)" in out
    last = max(logged_steps(run_dir))
    assert last < STEPS
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == last  # saved at the step boundary after the signal, off the save cadence


def test_plot_writes_png(reference, tmp_path):
    from apriel_jax.cli import main

    run_dir, _, _ = reference
    out = tmp_path / "curves.png"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_not_dividing_mesh_is_a_clear_error(tmp_path):
    cfg = make_cfg(tmp_path, "--config.data.global_batch=6")  # 8 devices on the fsdp axis
    with pytest.raises(ValueError, match=r"global_batch=6 does not divide over the mesh.*multiple of 8"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_repeated_non_finite_steps_stop_the_run_after_saving(tmp_path):
    """An absurd learning rate blows the parameters up; every later step is non-finite and skipped, and
    after max_bad_steps of them the run stops with status 'diverged' and a checkpoint on disk."""
    cfg = make_cfg(tmp_path / "run", "--config.optimizer.peak_lr=1e30", "--config.optimizer.warmup_fraction=0.0",
                   "--config.optimizer.clip_norm=1e30", "--config.max_bad_steps=2", "--config.eval.every=0",
                   "--config.log.tensorboard=false")
    summary = train(cfg)
    assert summary["status"] == "diverged"
    assert summary["step"] < STEPS
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped"] for r in log if r.get("split", "train") == "train" and "skipped" in r]
    assert skipped[-2:] == [1.0, 1.0]
    params = load_params(cfg)  # the run saved before stopping
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_a_run_from_a_checkpoint_computes_with_its_own_remat_and_attention(tmp_path):
    """An HF checkpoint's config says no remat and XLA attention; the run config's model block decides how the
    run computes (what `apriel-jax aot` sized it for), and the weights stay the checkpoint's."""
    from flax import nnx

    from apriel_jax.checkpoint.hf_export import export_hf
    from apriel_jax.model import create_model, get_preset
    from apriel_jax.train.loop import setup

    base = create_model(get_preset("tiny"), seed=5)
    export_hf(nnx.state(base), base.config.as_configdict(), tmp_path / "hf")
    cfg = make_cfg(tmp_path / "run", f"--config.init.from_pretrained={tmp_path / 'hf'}",
                   "--config.model.remat_policy=full", "--config.model.remat_group=2",
                   "--config.model.attention_impl=xla_blocked")
    run = setup(cfg)
    run.ckpt.close()
    model = nnx.merge(run.graphdef, run.state.params, run.state.frozen)
    assert (run.model_cfg.remat_policy, run.model_cfg.remat_group, run.model_cfg.attention_impl) == \
        ("full", 2, "xla_blocked")
    assert (model.decoder.remat_policy, model.decoder.remat_group) == ("full", 2)
    np.testing.assert_array_equal(np.asarray(model.decoder.embed[...]), np.asarray(base.decoder.embed[...]))
