"""``apriel-jax pipeline`` as a pod job runs it: the same command in every process (``jax.distributed``
over local CPU processes, the launch variables of ``launch/README.md``).

* A small pipeline (upscale with averaging, two SFT runs, a merge: ``MINI_PIPELINE``) on
  2 processes x 1 device, with process 1 SIGKILLed in the middle of the upscale stage: process 0 stops
  too, and rerunning the same command in both processes skips the finished stage, resumes the
  interrupted one and exports byte-identical safetensors to an uninterrupted 1 process x 2 devices run.
  Only process 0 writes markers, the summary and the plot.
* Processes started with different configs, or more processes than the batch divides into, stop at once
  with exit code 2 and one message, before anything is written.
* The host agreements every multi-process step relies on (``distributed.Hosts``): an error on one
  process stops the others at the next meeting point with its message; processes that see different
  states stop with one message; a directory published by several processes appears once, complete.
"""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_multiprocess import child_env, free_port

CLI = [sys.executable, "-m", "apriel_jax.cli"]
TIMEOUT_S = 900

# Every part of the stage runner on a small model: a random-init stage, a depth upscale whose final is the
# average of two checkpoints, two SFT runs from different stages, their merge.
MINI_PIPELINE = '''
from apriel_jax.stages.config import pipeline_config, stage


def get_config():
    cfg = pipeline_config()
    cfg.name = "mini"
    cfg.order = ["base", "upscale", "sft_a", "sft_b", "merge"]

    def train_stage(init, steps, **kw):
        s = stage(init=init, **kw)
        s.train.data.update(seq_len=32, global_batch=4)
        s.train.steps = steps
        s.train.checkpoint.update(save_every=2, keep_last=1, async_save=False)
        s.train.log.update(tensorboard=False, console=False)
        s.train.eval.update(every=steps, batches=1, at_start=True)
        return s

    cfg.stages.base = train_stage("random", 4)
    s = train_stage("previous", 6)
    s.transform.update(kind="upscale", num_layers=3)
    s.finalize.update(kind="average", num_checkpoints=2)
    s.train.debug.step_sleep_s = 0.0
    cfg.stages.upscale = s
    cfg.stages.sft_a = train_stage("previous", 2, trainable=("decoder",))
    cfg.stages.sft_b = train_stage("stage:upscale", 2, trainable=("decoder", "embeddings"))
    cfg.stages.sft_b.train.data.seed = 5
    m = stage("merge")
    m.merge.update(stages=["sft_a", "sft_b"], weights=[0.5, 0.5])
    cfg.stages.merge = m
    cfg.export.check_with_transformers = False
    return cfg
'''


class Processes:
    """One command started in ``processes`` local processes of ``devices`` CPU devices each."""

    def __init__(self, argv, processes: int, devices: int, log_dir: Path, extra=None):
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs, self.procs = [], []
        for pid in range(processes):
            env = child_env(devices) if processes == 1 else child_env(
                devices, APRIEL_COORDINATOR_ADDRESS=f"localhost:{port}", APRIEL_NUM_PROCESSES=processes,
                APRIEL_PROCESS_ID=pid)
            log = log_dir / f"process_{pid}_{port}.log"
            self.logs.append(log)
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen([*argv, *(extra or {}).get(pid, [])], cwd=log_dir, env=env,
                                                   stdout=out, stderr=subprocess.STDOUT))

    def wait(self, timeout=TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"processes did not finish within {timeout}s:\n{self.outputs()}")
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self, pid: int) -> str:
        return self.logs[pid].read_text()

    def outputs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in self.logs)


def pipeline(config, run_dir, processes, devices, *extra, per_process=None) -> Processes:
    argv = [*CLI, "pipeline", str(config), f"--config.run_dir={run_dir}", *extra]
    return Processes(argv, processes, devices, Path(run_dir).parent / f"{Path(run_dir).name}_logs", per_process)


def export_bytes(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "export" / "hf").glob("*.safetensors"))}


@pytest.fixture(scope="module")
def mini_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "mini.py"
    path.write_text(MINI_PIPELINE)
    return path


def test_a_killed_process_stops_the_job_and_the_rerun_exports_the_same_weights(mini_config, tmp_path):
    single = pipeline(mini_config, tmp_path / "single", 1, 2)
    assert single.wait() == [0], single.outputs()

    run = tmp_path / "pod"
    killed = pipeline(mini_config, run, 2, 1, "--config.stages.upscale.train.debug.step_sleep_s=1.5",
                      "--config.distributed.heartbeat_timeout_s=10")  # JAX's default is 100 s
    ckpt = run / "upscale" / "run" / "checkpoints"
    deadline = time.monotonic() + TIMEOUT_S
    while not (ckpt / "2").is_dir():
        if any(p.poll() is not None for p in killed.procs) or time.monotonic() > deadline:
            killed.kill()
            pytest.fail(f"the upscale stage did not reach its first checkpoint:\n{killed.outputs()}")
        time.sleep(0.2)
    killed.procs[1].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    codes = killed.wait(timeout=120)  # process 0 must not wait forever for its dead peer
    print(f"process 0 stopped {time.monotonic() - t_kill:.0f} s after process 1 was killed, exit {codes[0]}")
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0, killed.output(0)
    assert (run / "base" / "DONE.json").is_file() and not (run / "upscale" / "DONE.json").exists()

    rerun = pipeline(mini_config, run, 2, 1)
    assert rerun.wait() == [0, 0], rerun.outputs()
    for pid in (0, 1):
        out = rerun.output(pid)
        assert "[base] finished earlier" in out and "[upscale] done" in out, out
    assert "held-out loss" in rerun.output(0) and "held-out loss" not in rerun.output(1)  # one summary
    summary = json.loads((run / "summary.json").read_text())
    assert [s["stage"] for s in summary] == ["base", "upscale", "sft_a", "sft_b", "merge"]
    assert summary[1]["averaged_steps"] == [4, 6]
    assert (run / "curves.png").stat().st_size > 0
    assert not list(run.rglob(".*.partial"))  # every published directory was renamed into place

    a, b = export_bytes(tmp_path / "single"), export_bytes(run)
    assert a and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), "the 2-process pipeline exported different weights"


def test_processes_with_different_configs_or_an_uneven_batch_stop_before_writing(mini_config, tmp_path):
    run = tmp_path / "run"
    differing = pipeline(mini_config, run, 2, 1, per_process={1: ["--config.stages.sft_a.train.steps=3"]})
    assert differing.wait(timeout=300) == [2, 2], differing.outputs()
    for pid in (0, 1):
        assert "processes disagree on the run config" in differing.output(pid)
        assert "stages.sft_a.train.steps" in differing.output(pid)
    uneven = pipeline(mini_config, run, 3, 1)  # the mini pipeline's stages take 4 rows per step
    assert uneven.wait(timeout=300) == [2, 2, 2], uneven.outputs()
    assert "global_batch of stages {'base': 4, 'upscale': 4, 'sft_a': 4, 'sft_b': 4} is not divisible by the " \
           "3 processes" in uneven.output(0)
    assert not run.exists()  # nothing written


AGREEMENTS = textwrap.dedent('''
    import sys
    import numpy as np
    from apriel_jax.parallel import distributed
    distributed.initialize(None)
    import jax
    from apriel_jax import storage
    from apriel_jax.checkpoint.orbax_io import load_state, save_model
    from apriel_jax.model import create_model, get_preset
    from apriel_jax.parallel.mesh import make_mesh
    from flax import nnx

    hosts, out = distributed.hosts(), sys.argv[1]
    print("hosts", hosts.index, hosts.count, flush=True)
    try:  # an error on the primary reaches every process at the meeting point
        hosts.on_primary("failing on purpose", lambda: 1 / 0)
    except Exception as e:
        print("on_primary:", type(e).__name__, e, flush=True)
    try:  # processes that see different states stop together
        hosts.agree("which stages are finished", {"base": hosts.index == 0})
    except ValueError as e:
        print("agree:", e, flush=True)
    hosts.agree("the same view", {"base": True})

    # A model directory saved by both processes (each writes its shards) appears once, complete.
    cfg = get_preset("tiny")
    mesh = make_mesh({"fsdp": -1})
    state = nnx.state(create_model(cfg, seed=3, mesh=mesh))
    save_model(state, cfg, out, extra_files={"note.txt": b"written once"})
    restored = load_state(out, mesh=mesh)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(jax.device_get(a.addressable_data(0)),
                                                         jax.device_get(b.addressable_data(0)))), state, restored)
    print("saved and restored:", all(jax.tree.leaves(same)), flush=True)
''')


def test_processes_stop_together_and_publish_once(tmp_path):
    script = tmp_path / "agreements.py"
    script.write_text(AGREEMENTS)
    out = tmp_path / "model"
    procs = Processes([sys.executable, str(script), str(out)], 2, 1, tmp_path / "logs")
    assert procs.wait(timeout=300) == [0, 0], procs.outputs()
    first, second = procs.output(0), procs.output(1)
    assert "on_primary: ZeroDivisionError division by zero" in first
    assert "on_primary: PeerFailed process 0 of 2 failed while failing on purpose: ZeroDivisionError" in second
    for text in (first, second):
        assert "agree: processes disagree on which stages are finished: process 0 sees {\"base\": true}, " \
               "process 1 sees {\"base\": false}" in text
        assert "saved and restored: True" in text
    assert (out / "note.txt").read_bytes() == b"written once"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agreements.py", "logs", "model"]  # no partial left
