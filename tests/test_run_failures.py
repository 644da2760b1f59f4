"""A run meets bad numbers, a damaged checkpoint and a full disk: one line each, and nothing lost.

The CLI is called in-process (``apriel_jax.cli.main``): the exit code and stderr are what a user sees,
without paying a subprocess start per case. Runs are tiny (``configs/train/tiny_text.py``).
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from apriel_jax.cli import main
from apriel_jax.train.loop import load_params
from apriel_jax.utils.config_cli import apply_overrides, load_config_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "train" / "tiny_text.py")
COMMON = ["--config.checkpoint.save_every=3", "--config.checkpoint.async_save=false", "--config.eval.every=0",
          "--config.log.console=false", "--config.log.tensorboard=false"]


def cfg_for(run_dir, steps):
    cfg = load_config_file(CONFIG)
    return apply_overrides(cfg, [*COMMON, f"--config.run_dir={run_dir}", f"--config.steps={steps}"])


def train_cli(capsys, run_dir, steps, *extra) -> tuple[int, list[str]]:
    code = main(["train", CONFIG, *COMMON, f"--config.run_dir={run_dir}", f"--config.steps={steps}", *extra])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("value", ["-3e-3", "nan"])
def test_a_learning_rate_that_cannot_train_is_refused_before_anything_is_written(capsys, tmp_path, value):
    code, err = train_cli(capsys, tmp_path / "run", 2, f"--config.optimizer.peak_lr={value}")
    assert code == 2 and len(err) == 1
    assert "optimizer.peak_lr=" in err[0] and "must be a finite number > 0" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A 9-step run's checkpoints up to step 6 (3 and 6: as if stopped there) and its final parameters."""
    root = tmp_path_factory.mktemp("damage")
    assert main(["train", CONFIG, *COMMON, f"--config.run_dir={root / 'nine'}", "--config.steps=9",
                 "--config.checkpoint.keep_last=3"]) == 0
    final = load_params(cfg_for(root / "nine", 9))
    shutil.copytree(root / "nine", root / "six")
    shutil.rmtree(root / "six" / "checkpoints" / "9")
    return root / "six", final


def damaged_copy(six_steps, tmp_path) -> Path:
    """A copy of the six-step run whose latest checkpoint lost one of its data files: the largest, which
    surely holds parameters (OCDBT may also keep small files that a restore no longer reads)."""
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps[0], run_dir)
    data_files = (run_dir / "checkpoints" / "6" / "state").rglob("ocdbt.process_0/d/*")
    max(data_files, key=lambda p: p.stat().st_size).unlink()
    return run_dir


def test_a_damaged_latest_checkpoint_falls_back_to_the_intact_one(capsys, six_steps, tmp_path):
    run_dir = damaged_copy(six_steps, tmp_path)
    code, err = train_cli(capsys, run_dir, 9)
    assert code == 0
    assert len(err) == 1 and err[0].startswith("checkpoint step 6 cannot be restored (")
    assert f"moved to {run_dir / 'checkpoints.damaged' / '6'}; resuming from step 3" in err[0]
    assert (run_dir / "checkpoints.damaged" / "6" / "state").is_dir()  # kept aside, not deleted
    # Resumed from step 3, the run redoes steps 4-9 and ends where an uninterrupted run ends.
    got, want = load_params(cfg_for(run_dir, 9)), six_steps[1]
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_no_fallback_refuses_in_one_line_and_moves_nothing(capsys, six_steps, tmp_path):
    run_dir = damaged_copy(six_steps, tmp_path)
    code, err = train_cli(capsys, run_dir, 9, "--no-fallback")
    assert code == 2 and len(err) == 1
    assert f"{run_dir / 'checkpoints' / '6'}: the latest checkpoint cannot be restored:" in err[0]
    assert "checkpoint.fallback is off" in err[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3", "6"]
    assert not (run_dir / "checkpoints.damaged").exists()


def test_a_config_that_does_not_fit_the_checkpoints_never_sets_them_aside(six_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps[0], run_dir)
    cfg = apply_overrides(cfg_for(run_dir, 9), ["--config.model.decoder.intermediate_size=96"])
    with pytest.raises(Exception) as info:
        load_params(cfg)
    assert "cannot be restored" not in str(info.value) or "nothing was moved" in str(info.value)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3", "6"]
    assert not (run_dir / "checkpoints.damaged").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 7 MB tmpfs: room for two checkpoints of the tiny model (2.7 MB each) and not a third."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {err}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_the_run_at_once_with_one_line_and_keeps_the_last_checkpoint(capsys, small_disk,
                                                                                        tmp_path):
    run_dir = small_disk / "run"
    code, err = train_cli(capsys, run_dir, 12, "--config.checkpoint.async_save=true")
    assert code == 74, err
    assert len(err) == 1, "\n".join(err[:20])
    assert err[0].startswith("stopped at step ") and "storage failed" in err[0]
    assert f"{run_dir / 'checkpoints'}: cannot write the checkpoint:" in err[0]
    assert "No space left on device" in err[0]
    stopped_at = int(err[0].split()[3].rstrip(":"))
    assert stopped_at < 12  # at once: not after running to the end
    # The checkpoints before the failed one are intact: moved to a disk with room, the run resumes from
    # the newest of them and completes.
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
    saved = max(int(p.name) for p in (moved / "checkpoints").iterdir() if p.name.isdigit())
    assert saved < stopped_at
    code = main(["train", CONFIG, *COMMON, f"--config.run_dir={moved}", "--config.steps=12",
                 "--config.log.console=true"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"resumed from {moved / 'checkpoints'} at step {saved}" in out.out


def test_too_many_malformed_records_stop_the_run_after_saving(capsys, tmp_path):
    lines = []
    for i in range(40):
        lines.append(json.dumps({"text": f"paragraph number {i} of the good data."}))
        lines.append('{"text": 5}' if i % 2 else "{not json")  # half the records are malformed
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    source = json.dumps([{"name": "mixed", "kind": "jsonl", "paths": [str(data)], "weight": 1.0, "options": {}}])
    code, err = train_cli(capsys, tmp_path / "run", 6, f"--config.data.sources={source}",
                          "--config.data.skip_check_after=20", "--config.log.console=true")
    assert code == 65
    assert len(err) == 1 and err[0].startswith("stopped at step ")
    assert "more than data.max_skip_fraction=0.01" in err[0] and "invalid_json" in err[0]
    assert "bad_schema" in err[0] or "empty_text" in err[0]
    assert any((tmp_path / "run" / "checkpoints").iterdir())  # saved before stopping
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["data/skip_fraction"] > 0.3
