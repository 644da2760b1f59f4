"""Multi-process training on localhost: several CPU processes joined by jax.distributed (gloo collectives).

One single-process reference run (4 CPU devices) is shared. A 4-process run (1 device each) is stopped
by a SIGTERM that reaches only process 0, then resumed by 2 processes (2 devices each): the loss curve,
the rows every process fed and the final parameters must match the reference. Also: the error cases
(global batch vs processes, processes disagreeing on the config, a missing process), the process-layout
resolution from the environment, and cutting the data iterator state for another process count.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from apriel_jax.data.packing import PackingConfig
from apriel_jax.data.pipeline import (
    ByteTextToDocument,
    build_dataset,
    merge_row_states,
    select_row_state,
)
from apriel_jax.parallel import distributed
from apriel_jax.train.inputs import ParagraphSource
from apriel_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train" / "tiny_text.py"
STEPS = 4
GLOBAL_BATCH = 8
RUN_TIMEOUT_S = 240
# The `apriel-jax` entry point. Not `python -m apriel_jax.cli`: run as __main__, its UsageError would be
# another class than the one cli_train raises, and a bad config would exit 1 with a traceback.
CLI = [sys.executable, "-c", "import sys; from apriel_jax.cli import main; sys.exit(main())"]


def _paragraphs() -> str:
    """Distinct paragraphs of varied length, so a row's token hash identifies which global row it is."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    return "\n\n".join(f"record {i}: " + " ".join(rng.choice(words, size=int(rng.integers(2, 12))))
                       for i in range(200))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "paragraphs.txt"
    path.write_text(_paragraphs())
    return path


def common_overrides(text_file) -> list[str]:
    source = {"name": "text", "kind": "bytes_text", "paths": [str(text_file)], "weight": 1.0}
    return [f"--config.steps={STEPS}", f"--config.data.global_batch={GLOBAL_BATCH}",
            f"--config.data.sources=[{source!r}]", "--config.checkpoint.save_every=2",
            "--config.checkpoint.async_save=false", "--config.eval.every=0", "--config.log.tensorboard=false",
            "--config.debug.log_rows=true", "--config.mesh.fsdp=-1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(devices: int, **extra) -> dict:
    """The parent's environment with its own CPU device count (conftest's 8 replaced)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APRIEL_", "SLURM_")) or k == "APRIEL_COMPILE_CACHE"}  # the session's cache
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Launch:
    """``apriel-jax train`` in ``processes`` local processes (``which``: the ids actually started)."""

    def __init__(self, processes: int, devices: int, run_dir, overrides, *, which=None, per_process=None):
        self.port = free_port()
        self.logs, self.procs = [], []
        log_dir = Path(run_dir).parent / f"{Path(run_dir).name}_logs_{processes}x{devices}_{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        for pid in (range(processes) if which is None else which):
            env = child_env(devices) if processes == 1 else child_env(
                devices, APRIEL_COORDINATOR_ADDRESS=f"localhost:{self.port}", APRIEL_NUM_PROCESSES=processes,
                APRIEL_PROCESS_ID=pid)
            extra = list((per_process or {}).get(pid, []))
            cmd = [*CLI, "train", str(CONFIG), *overrides, f"--config.run_dir={run_dir}", *extra]
            log = log_dir / f"process_{pid}.log"
            self.logs.append(log)
            with open(log, "w") as out:  # the child keeps its own copy of the descriptor
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))

    def wait(self, timeout=RUN_TIMEOUT_S) -> list[tuple[int, str]]:
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in self.procs:
                p.kill()
            pytest.fail(f"processes did not finish within {timeout}s:\n{self.outputs()}")
        return [(p.returncode, log.read_text()) for p, log in zip(self.procs, self.logs)]

    def outputs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)


def losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(Path(run_dir) / "metrics.jsonl") if e["split"] == "train"}


def fed_rows(run_dir) -> list[dict]:
    """Every rows.jsonl entry of every process (step, process, rows, token_crc32)."""
    return [json.loads(line) for path in sorted(Path(run_dir).glob("hosts/process_*/rows.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def saved_state(run_dir, step: int) -> dict[str, np.ndarray]:
    """{path: array} of a checkpoint's whole train state (params, optimizer moments, step), read as numpy
    in this one process whatever process layout wrote it."""
    import jax
    import orbax.checkpoint as ocp

    path = Path(run_dir) / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restored = checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file):
    run_dir = tmp_path_factory.mktemp("mp") / "reference"
    ((rc, out),) = Launch(1, 4, run_dir, common_overrides(text_file)).wait()
    assert rc == 0, out
    return run_dir


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, text_file):
    """4 processes x 1 device, preempted by a SIGTERM to process 0 only; resumed by 2 processes x 2 devices."""
    run_dir = tmp_path_factory.mktemp("mp") / "resharded"
    first = Launch(4, 1, run_dir, [*common_overrides(text_file), "--config.debug.step_sleep_s=1.0"])
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (run_dir / "metrics.jsonl").exists() or 1 not in losses(run_dir):
        if any(p.poll() is not None for p in first.procs) or time.monotonic() > deadline:
            for p in first.procs:
                p.kill()
            pytest.fail(f"4-process run did not reach step 1:\n{first.outputs()}")
        time.sleep(0.05)
    first.procs[0].send_signal(signal.SIGTERM)
    preempted = first.wait()
    stopped = max(losses(run_dir))
    second = Launch(2, 2, run_dir, common_overrides(text_file)).wait()
    return run_dir, preempted, stopped, second


def test_sigterm_on_one_process_stops_all_at_the_same_step(resharded):
    run_dir, preempted, stopped, _ = resharded
    assert [rc for rc, _ in preempted] == [75] * 4, "\n".join(out for _, out in preempted)
    assert 1 <= stopped < STEPS
    # Every process stopped after the same step and saved there, together.
    assert all(f"train: preempted at step {stopped} " in out for _, out in preempted)
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert stopped in saved


def test_processes_match_the_single_process_run(reference, resharded):
    run_dir, _, stopped, second = resharded
    assert [rc for rc, _ in second] == [0, 0], "\n".join(out for _, out in second)
    assert f"resumed from {run_dir / 'checkpoints'} at step {stopped}" in second[0][1]
    expected, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    # Same global batch, same 4 devices, fp32: only the order of cross-process reductions may differ.
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)],
                               rtol=1e-6, atol=0)


def test_each_process_reads_only_its_rows(reference, resharded):
    run_dir, _, stopped, _ = resharded
    ref = {e["step"]: e["token_crc32"] for e in fed_rows(reference)}
    assert sorted(ref) == list(range(1, STEPS + 1)) and len(ref[1]) == GLOBAL_BATCH
    assert len(set(ref[1])) == GLOBAL_BATCH  # distinct rows: a hash identifies its global row
    entries = fed_rows(run_dir)
    for step in range(1, STEPS + 1):
        at = sorted((e for e in entries if e["step"] == step), key=lambda e: e["process"])
        layout = 4 if step <= stopped else 2  # 4 processes x 2 rows, then (resumed) 2 processes x 4 rows
        per = GLOBAL_BATCH // layout
        assert [e["process"] for e in at] == list(range(layout)), (step, at)
        for e in at:
            assert e["rows"] == list(range(e["process"] * per, (e["process"] + 1) * per))
            # What it fed is exactly those rows of the single-process global batch (and nothing else).
            assert e["token_crc32"] == [ref[step][r] for r in e["rows"]], (step, e)


def test_final_state_matches_the_single_process_run(reference, resharded):
    """Parameters and optimizer moments saved by the 2 resumed processes = the single process's."""
    expected, got = saved_state(reference, STEPS), saved_state(resharded[0], STEPS)
    assert expected.keys() == got.keys() and any("embed" in k for k in got)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=5e-6, err_msg=name)


def test_global_batch_not_dividing_over_processes(tmp_path, text_file):
    out = Launch(2, 1, tmp_path / "run", [*common_overrides(text_file), "--config.data.global_batch=3"]).wait()
    for rc, text in out:
        assert rc == 2, text
        assert "global_batch=3 does not divide over the mesh" in text and "2 devices of 2 processes" in text


def test_processes_disagreeing_on_the_config(tmp_path, text_file):
    out = Launch(2, 1, tmp_path / "run", common_overrides(text_file),
                 per_process={1: ["--config.optimizer.peak_lr=0.01"]}).wait()
    for rc, text in out:
        assert rc == 2, text
        assert "processes disagree on the run config" in text
        assert "process 1 differs in ['optimizer.peak_lr']" in text


def test_missing_process_times_out_with_a_clear_message(tmp_path, text_file):
    launch = Launch(2, 1, tmp_path / "run", [*common_overrides(text_file),
                                             "--config.distributed.initialization_timeout_s=3"], which=[1])
    ((rc, text),) = launch.wait(timeout=120)
    assert rc == distributed.EXIT_MISSING_PROCESS, text
    assert f"waiting for 2 processes at coordinator localhost:{launch.port}" in text
    assert "did not complete within 3s: this is process 1" in text


# --- Without subprocesses: the process layout from the environment, and the data state across layouts.

def test_resolve_process_layout():
    assert distributed.resolve(None, {}) is None  # one process: nothing to do
    env = {"APRIEL_COORDINATOR_ADDRESS": "10.0.0.1:1234", "APRIEL_NUM_PROCESSES": "4", "APRIEL_PROCESS_ID": "3"}
    assert distributed.resolve(None, env) == distributed.Plan("env", "10.0.0.1:1234", 4, 3)
    # Config wins over the environment; the run config's distributed section is accepted as is.
    assert distributed.resolve({"process_id": 1}, env).process_id == 1
    slurm = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5", "SLURM_NTASKS": "16",
             "SLURM_STEP_NODELIST": "gpu[007-010,12],login1"}
    assert distributed.resolve({"port": 9999}, slurm) == distributed.Plan("slurm", "gpu007:9999", 16, 5)
    # The batch script itself (no srun step) is a single process even in a many-task job.
    assert distributed.resolve(None, {"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "a[1-2]"}) is None
    assert distributed.resolve(None, {"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed.resolve(None, {"TPU_WORKER_HOSTNAMES": "t1,t2"}) == distributed.Plan("tpu")
    assert distributed.resolve({"mode": "off"}, env) is None
    assert distributed.first_slurm_host("node1") == "node1"
    assert distributed.first_slurm_host("rack[3-4]-n[01-02]") == "rack3-n01"
    with pytest.raises(ValueError, match="is not one of"):
        distributed.resolve({"mode": "mpi"}, {})
    with pytest.raises(ValueError, match="unknown option"):
        distributed.resolve({"mode": "env", "procs": 2}, {})


@pytest.mark.parametrize("env, match", [
    ({"APRIEL_NUM_PROCESSES": "2"}, r"missing this process's id .*; the coordinator host:port"),
    ({"APRIEL_NUM_PROCESSES": "2", "APRIEL_PROCESS_ID": "2", "APRIEL_COORDINATOR_ADDRESS": "h:1"},
     "process id 2 is not below the process count 2"),
    ({"APRIEL_NUM_PROCESSES": "two"}, "APRIEL_NUM_PROCESSES='two' is not an integer"),
    ({"APRIEL_NUM_PROCESSES": "2", "APRIEL_PROCESS_ID": "0", "APRIEL_COORDINATOR_ADDRESS": "host"}, "must be host:port"),
])
def test_bad_process_layout_is_a_clear_error(env, match):
    with pytest.raises(ValueError, match=match):
        distributed.resolve(None, env)


def _batches(row_ids, state=None, n=2):
    ds = build_dataset({"t": (ParagraphSource(text=_paragraphs()), 1.0)}, ByteTextToDocument(),
                       PackingConfig(seq_len=48, patch_budget=0), global_batch=GLOBAL_BATCH, seed=3,
                       row_ids=row_ids)
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    out = [next(it)["tokens"] for _ in range(n)]
    return out, it.get_state()


def test_data_state_moves_between_process_layouts():
    """4 shards' states -> one whole-batch state -> 2 shards: they continue exactly like one process."""
    whole, _ = _batches(range(GLOBAL_BATCH), n=4)
    quarters = [_batches(range(2 * q, 2 * q + 2)) for q in range(4)]
    np.testing.assert_array_equal(np.concatenate([b[0] for b, _ in quarters]), whole[0])
    merged = merge_row_states([(list(range(2 * q, 2 * q + 2)), st) for q, (_, st) in enumerate(quarters)],
                              GLOBAL_BATCH)
    _, single_state = _batches(range(GLOBAL_BATCH))
    assert merged["grain"] == single_state["grain"]  # the layout of a single process's state
    assert merged["stats"]["packing"] == single_state["stats"]["packing"]
    halves = [_batches(rows, select_row_state(merged, rows))[0]
              for rows in (list(range(4)), list(range(4, 8)))]
    for t in range(2):
        np.testing.assert_array_equal(np.concatenate([h[t] for h in halves]), whole[2 + t])
    assert select_row_state(merged, list(range(GLOBAL_BATCH))) is merged  # one process: unchanged
