"""The launchers' dry runs (launch/*.py): the commands, manifest and sbatch script they would submit.

Nothing here runs gcloud, kubectl, xpk or sbatch, or touches the network: every call is a --dry-run
(checked: the runner must not start a subprocess) or fails on its arguments first.
"""

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
TRAIN = ["apriel-jax", "train", "configs/train/tiny_text.py", "--config.run_dir=gs://bucket/runs/a b"]


def load(name):
    sys.path.insert(0, str(LAUNCH))
    try:
        spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(LAUNCH))


@pytest.fixture(autouse=True)
def no_subprocesses(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a launcher tried to run {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def run(capsys, name, *argv):
    rc = load(name).main([*argv, "--", *TRAIN])
    out = capsys.readouterr().out
    return rc, out


def test_tpu_pod_dry_run_prints_every_command(capsys):
    rc, out = run(capsys, "tpu_pod", "--tpu", "my-v5p", "--zone", "us-east5-a", "--project", "proj", "--create",
                  "--accelerator-type", "v5p-64", "--run-name", "r1", "--dry-run")
    assert rc == 0
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud")]
    verbs = [c[4] for c in commands]
    assert verbs == ["create", "scp", "ssh", "ssh"]
    create, scp, install, start = commands
    assert "--accelerator-type=v5p-64" in create and "--version=v2-alpha-tpuv5" in create
    for c in commands:
        assert c[5] == "my-v5p" or c[4] == "scp"
        assert "--zone=us-east5-a" in c and "--project=proj" in c
    assert "--worker=all" in scp and "--worker=all" in install and "--worker=all" in start
    assert scp[5].endswith(".tar.gz") and scp[6] == "my-v5p:apriel-jax-checkout.tar.gz"
    assert 'pip install -q -e ".[tpu]"' in install[-3]
    script = next(a for a in start if a.startswith("--command="))
    # The train command, quoted as given, run in the checkout's venv, teed to a per-worker log.
    assert shlex.join(TRAIN) in script
    assert "tee logs/r1/$(hostname).log" in script and script.startswith("--command=set -o pipefail; cd apriel-jax")
    assert "apriel-jax/logs/r1" in out.splitlines()[-1]  # how to fetch the worker logs


def test_tpu_pod_git_install_and_detach(capsys):
    rc, out = run(capsys, "tpu_pod", "--tpu", "pod", "--zone", "z", "--install", "git", "--repo-url",
                  "https://example.com/apriel-jax.git", "--ref", "v1", "--detach", "--dry-run")
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("gcloud")]
    assert len(lines) == 2 and all("--worker=all" in line for line in lines)
    assert "git clone https://example.com/apriel-jax.git apriel-jax" in lines[0] and "git checkout -q v1" in lines[0]
    assert "nohup apriel-jax train" in lines[1] and "< /dev/null &" in lines[1]


@pytest.mark.parametrize("argv, message", [
    (["--tpu", "p", "--zone", "z", "--create"], "--create needs --accelerator-type"),
    (["--tpu", "p", "--zone", "z", "--create", "--accelerator-type", "v9-8"], "--create needs --accelerator-type"),
    (["--tpu", "p", "--zone", "z", "--install", "git"], "--install git needs --repo-url"),
    (["--tpu", "My_TPU", "--zone", "z"], "not a valid TPU name"),
])
def test_tpu_pod_bad_arguments(argv, message):
    module = load("tpu_pod")
    with pytest.raises(module.LaunchError, match=message):
        module.main([*argv, "--dry-run", "--", *TRAIN])


def test_launcher_without_command_is_a_clear_error(capsys, monkeypatch):
    module = load("tpu_pod")
    with pytest.raises(module.LaunchError, match="no command to run: put it after --"):
        module.main(["--tpu", "p", "--zone", "z", "--dry-run"])

    # As a script (main_wrapper): one line on stderr, exit code 2, as for argparse's own errors.
    monkeypatch.setattr(sys, "argv", ["tpu_pod.py", "--tpu", "p", "--zone", "z", "--dry-run"])
    assert module.main_wrapper(module.main) == 2
    assert capsys.readouterr().err.startswith("error: no command to run")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--zone", "z", "--dry-run", "--", *TRAIN])  # --tpu missing
    assert exit_info.value.code == 2


def manifest_of(capsys, *argv):
    yaml = pytest.importorskip("yaml")
    rc, out = run(capsys, "gke_jobset", *argv, "--dry-run")
    assert rc == 0
    doc, _, commands = out.partition("\n---\n")
    return yaml.safe_load(doc), commands.strip().splitlines()


def test_gke_jobset_multislice_manifest(capsys, tmp_path):
    out = tmp_path / "js.yaml"
    m, commands = manifest_of(capsys, "--name", "apriel-cpt", "--accelerator", "v5p", "--topology", "4x4x4",
                              "--num-slices", "3", "--image", "gcr.io/p/apriel:1", "--out", str(out),
                              "--xpk-cluster", "c1", "--project", "proj", "--zone", "us-east5")
    assert not out.exists()  # dry run: nothing written
    assert m["kind"] == "JobSet" and m["metadata"]["name"] == "apriel-cpt"
    (job,) = m["spec"]["replicatedJobs"]
    assert job["replicas"] == 3  # one Job per slice
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 16  # 64 chips / 4 per host
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x4"}
    (container,) = pod["containers"]
    assert container["image"] == "gcr.io/p/apriel:1" and container["resources"]["limits"]["google.com/tpu"] == 4
    assert container["command"][:2] == ["bash", "-c"]
    assert container["command"][2] == shlex.join(TRAIN) + " --config.mesh_dcn.data=3"
    env = {e["name"]: e for e in container["env"]}
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "3"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "apriel-cpt-slice-0-0.apriel-cpt"
    assert "job-index" in env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert commands[0] == f"kubectl apply -f {out}"
    xpk = shlex.split(commands[1])
    assert xpk[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=c1", "--workload=apriel-cpt", "--tpu-type=v5p-128", "--num-slices=3",
            "--docker-image=gcr.io/p/apriel:1", "--project=proj", "--zone=us-east5"} <= set(xpk)


def test_gke_jobset_single_slice_and_writing(capsys, tmp_path):
    m, _ = manifest_of(capsys, "--name", "one", "--accelerator", "v5e", "--topology", "2x4", "--image", "i")
    spec = m["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert m["spec"]["replicatedJobs"][0]["replicas"] == 1 and spec["parallelism"] == 1  # 8 chips on one host
    container = spec["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["google.com/tpu"] == 8
    assert not any(e["name"].startswith("MEGASCALE") for e in container["env"])
    assert "mesh_dcn" not in container["command"][2]
    out = tmp_path / "m.yaml"
    rc, printed = run(capsys, "gke_jobset", "--name", "one", "--accelerator", "v6e", "--topology", "16x16",
                      "--image", "i", "--out", str(out))
    assert rc == 0 and f"kubectl apply -f {out}" in printed
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(out.read_text())["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 64


@pytest.mark.parametrize("argv, message", [
    (["--accelerator", "v5p", "--topology", "4x4"], "v5p topologies have 3 dimensions"),
    (["--accelerator", "v5e", "--topology", "16x16x"], "v5e topologies have 2 dimensions"),
    (["--accelerator", "v5e", "--topology", "0x4"], "has no chips"),
])
def test_gke_jobset_bad_topology(argv, message):
    module = load("gke_jobset")
    with pytest.raises(module.LaunchError, match=message):
        module.main(["--name", "x", "--image", "i", *argv, "--dry-run", "--", *TRAIN])


def test_gke_jobset_bad_name_and_slices(capsys):
    module = load("gke_jobset")
    with pytest.raises(module.LaunchError, match="must be a DNS label"):
        module.main(["--name", "Bad_Name", "--image", "i", "--accelerator", "v5e", "--topology", "2x2",
                     "--dry-run", "--", *TRAIN])
    with pytest.raises(SystemExit):
        module.main(["--name", "x", "--image", "i", "--accelerator", "v5e", "--topology", "2x2",
                     "--num-slices", "0", "--dry-run", "--", *TRAIN])
    assert "--num-slices: 0 must be >= 1" in capsys.readouterr().err


def sbatch_of(capsys, *argv):
    rc, out = run(capsys, "slurm_gpu", *argv, "--dry-run")
    assert rc == 0
    lines = out.splitlines()
    return lines, lines[-1]


def test_slurm_one_task_per_gpu(capsys):
    lines, submit = sbatch_of(capsys, "--nodes", "4", "--gpus-per-node", "8", "--partition", "a100",
                              "--setup", "source /shared/venv/bin/activate", "--job-name", "cpt")
    directives = [line.split(" ", 1)[1] for line in lines if line.startswith("#SBATCH")]
    assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=a100",
            "--job-name=cpt"} <= set(directives)
    assert "source /shared/venv/bin/activate" in lines
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert "--nodes=4 --ntasks-per-node=8" in lines[srun] and "--output=logs/slurm/%x-%j-task%t.log" in lines[srun]
    task = shlex.split(lines[srun + 1])
    assert task[:2] == ["bash", "-c"]
    assert task[2] == "export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; exec " + shlex.join(TRAIN)
    # The coordinator: the first node of the allocation.
    assert any("scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1" in line for line in lines)
    assert 'export APRIEL_COORDINATOR_ADDRESS="$head_node:8476"' in lines
    assert submit == "sbatch logs/slurm/cpt.sbatch"


def test_slurm_one_task_per_node(capsys):
    lines, _ = sbatch_of(capsys, "--nodes", "2", "--gpus-per-node", "4", "--tasks", "per-node", "--port", "9000")
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --gpus-per-node=4" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--ntasks-per-node=1 --gpus-per-node=4" in srun
    assert not any("CUDA_VISIBLE_DEVICES" in line for line in lines)  # the task drives all 4 GPUs
    assert 'export APRIEL_COORDINATOR_ADDRESS="$head_node:9000"' in lines


def test_slurm_script_matches_what_the_processes_resolve():
    """The env srun gives task 5 of the generated job resolves to the coordinator the script exports."""
    from apriel_jax.parallel import distributed

    env = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "APRIEL_COORDINATOR_ADDRESS": "gpu07:8476"}
    assert distributed.resolve(None, env) == distributed.Plan("slurm", "gpu07:8476", 16, 5)
    del env["APRIEL_COORDINATOR_ADDRESS"]  # without the export: the first node of the step's node list
    assert distributed.resolve(None, env).coordinator == "gpu07:8476"


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "1 day"], "--time '1 day' must look like HH:MM:SS"),
    (["--nodes", "2", "--gpus-per-node", "8", "--job-name", "a b"], "--job-name 'a b'"),
])
def test_slurm_bad_arguments(argv, message):
    module = load("slurm_gpu")
    with pytest.raises(module.LaunchError, match=re.escape(message)):
        module.main([*argv, "--dry-run", "--", *TRAIN])


def test_slurm_bad_counts(capsys):
    module = load("slurm_gpu")
    for argv in (["--nodes", "0", "--gpus-per-node", "8"], ["--nodes", "2", "--gpus-per-node", "x"]):
        with pytest.raises(SystemExit):
            module.main([*argv, "--dry-run", "--", *TRAIN])
    err = capsys.readouterr().err
    assert "--nodes: 0 must be >= 1" in err and "--gpus-per-node: 'x' is not an integer" in err
