"""The launchers (launch/*.py): the commands, manifest and sbatch script they would submit, the queued-resource
loop's decisions, and the container image's install line.

Nothing here runs gcloud, kubectl, xpk, docker or sbatch, or touches the network: every call is a --dry-run
(checked: the runner must not start a subprocess), fails on its arguments first, or talks to a fake gcloud.
"""

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
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


def test_default_command_is_the_pipeline(capsys):
    """Without a program after --, every launcher runs `apriel-jax pipeline CONFIG` plus the words after --."""
    common = load("launch_common")
    assert common.launched_command("c.py:gs://b/data", ["--config.run_dir=gs://b/r", "--no-export"]) == (
        "apriel-jax pipeline c.py:gs://b/data --config.run_dir=gs://b/r --no-export")
    assert common.launched_command("c.py", TRAIN) == shlex.join(TRAIN)  # a whole command is run as given
    pipeline = "apriel-jax pipeline configs/pipelines/apriel_15b.py"
    for name, argv in (("tpu_pod", ["--tpu", "p", "--zone", "z", "--install", "none"]),
                       ("slurm_gpu", ["--nodes", "1", "--gpus-per-node", "8"]),
                       ("gke_jobset", ["--name", "x", "--accelerator", "v5e", "--topology", "2x2", "--image", "i"]),
                       ("tpu_queued", ["--name", "q", "--zone", "z", "--accelerator-type", "v5p-8",
                                       "--install", "none"])):
        assert load(name).main([*argv, "--dry-run"]) == 0
        assert pipeline in capsys.readouterr().out, name


def test_bad_argument_is_one_line_and_exit_code_2(capsys, monkeypatch):
    module = load("tpu_pod")
    # As a script (main_wrapper): one line on stderr, exit code 2, as for argparse's own errors.
    monkeypatch.setattr(sys, "argv", ["tpu_pod.py", "--tpu", "My_TPU", "--zone", "z", "--dry-run"])
    assert module.main_wrapper(module.main) == 2
    assert capsys.readouterr().err.startswith("error: --tpu 'My_TPU' is not a valid TPU name")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--zone", "z", "--dry-run", "--", *TRAIN])  # --tpu missing
    assert exit_info.value.code == 2


def manifest_of(capsys, *argv, command=TRAIN):
    yaml = pytest.importorskip("yaml")
    rc = load("gke_jobset").main([*argv, "--dry-run", "--", *command])
    assert rc == 0
    doc, _, commands = capsys.readouterr().out.partition("\n---\n")
    return yaml.safe_load(doc), [line for line in commands.strip().splitlines() if not line.startswith("#")]


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
    assert commands[:3] == ["docker build -f launch/Dockerfile -t gcr.io/p/apriel:1 .", "docker push gcr.io/p/apriel:1",
                            f"kubectl apply -f {out}"]
    xpk = shlex.split(commands[3])
    assert xpk[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=c1", "--workload=apriel-cpt", "--tpu-type=v5p-128", "--num-slices=3",
            "--docker-image=gcr.io/p/apriel:1", "--project=proj", "--zone=us-east5", "--max-restarts=10",
            "--termination-grace-period-seconds=300", "--restart-on-user-code-failure"} <= set(xpk)


def test_gke_jobset_restarts_after_preemption_with_time_to_save(capsys):
    """Restarts are on by default, pods get a grace period sized for a checkpoint save, and the exit codes a
    rerun would only repeat fail the JobSet at once (the same codes `apriel-jax train` uses for them)."""
    from apriel_jax.cli import EXIT_USAGE
    from apriel_jax.train.config import EXIT_CODES

    m, _ = manifest_of(capsys, "--name", "apriel-15b", "--accelerator", "v5p", "--topology", "4x4x4", "--image", "i",
                       "--pipeline", "configs/pipelines/apriel_15b.py:gs://b/data",
                       command=["--config.run_dir=gs://b/r"])
    policy = m["spec"]["failurePolicy"]
    assert policy["maxRestarts"] > 0
    assert policy["rules"] == [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]
    job = m["spec"]["replicatedJobs"][0]["template"]["spec"]
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["operator"] == "In"
    assert sorted(rule["onExitCodes"]["values"]) == sorted([EXIT_USAGE, EXIT_CODES["diverged"], EXIT_CODES["bad_data"]])
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 120
    assert rule["onExitCodes"]["containerName"] == pod["containers"][0]["name"]
    assert pod["containers"][0]["command"][2] == (
        "apriel-jax pipeline configs/pipelines/apriel_15b.py:gs://b/data --config.run_dir=gs://b/r")

    m, _ = manifest_of(capsys, "--name", "x", "--accelerator", "v5p", "--topology", "4x4x4", "--image", "i",
                       "--num-slices", "2", "--max-restarts", "3", "--grace-period-s", "900", command=[])
    assert m["spec"]["failurePolicy"]["maxRestarts"] == 3
    pod = m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900
    assert pod["containers"][0]["command"][2].endswith(" --config.mesh_dcn.data=2")  # slices in the pipeline too


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


QUEUED = ["--name", "apriel-15b", "--zone", "us-east5-a", "--project", "proj", "--accelerator-type", "v5p-128",
          "--spot", "--install", "git", "--repo-url", "https://example.com/apriel-jax.git", "--run-name", "r1"]


def test_tpu_queued_dry_run_prints_one_pass_and_the_recreate(capsys):
    rc = load("tpu_queued").main([*QUEUED, "--pipeline", "configs/pipelines/apriel_15b.py:gs://b/data", "--dry-run",
                                  "--", "--config.run_dir=gs://b/runs/apriel-15b"])
    assert rc == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("gcloud")]
    assert [c[3:5] for c in commands] == [["queued-resources", "describe"], ["queued-resources", "delete"],
                                          ["queued-resources", "create"], ["queued-resources", "describe"],
                                          ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    describe, delete, create, _, install, start = commands
    assert all(c[5] == "apriel-15b" and "--zone=us-east5-a" in c and "--project=proj" in c for c in commands)
    assert "--format=value(state.state)" in describe
    assert {"--force", "--quiet"} <= set(delete)
    assert {"--node-id=apriel-15b", "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5",
            "--spot"} <= set(create)
    assert "git clone https://example.com/apriel-jax.git" in install[-3] and "--worker=all" in install
    script = next(a for a in start if a.startswith("--command="))
    assert ("apriel-jax pipeline configs/pipelines/apriel_15b.py:gs://b/data --config.run_dir=gs://b/runs/apriel-15b"
            " 2>&1 | tee logs/r1/$(hostname).log") in script


class FakeGcloud:
    """Answers the loop's gcloud commands from a script: the queued resource's states, one per describe
    (None: not found), and the exit code of every other command, in order, by verb."""

    def __init__(self, states, codes):
        self.states, self.codes, self.verbs = list(states), {k: list(v) for k, v in codes.items()}, []

    def output(self, argv):
        self.verbs.append("describe")
        state = self.states.pop(0)
        return (0, f"{state}\n") if state else (1, "")

    def run(self, argv):
        verb = argv[4] if argv[4] != "ssh" else "run" if any("| tee logs/" in a for a in argv) else "install"
        self.verbs.append(verb)
        return self.codes[verb].pop(0)


def loop(fake, *extra):
    module = load("tpu_queued")
    args = module.parse_args([*QUEUED, "--poll-s", "5", *extra])
    sleeps = []
    rc = module.keep_running(fake, args, shlex.join(TRAIN), sleep=sleeps.append)
    return rc, sleeps


def test_tpu_queued_recreates_a_preempted_slice_and_resumes():
    fake = FakeGcloud(states=[None, "WAITING_FOR_RESOURCES", "ACTIVE", "SUSPENDED", "SUSPENDED", None, "ACTIVE"],
                      codes={"create": [0, 0], "delete": [0], "install": [0, 0], "run": [75, 0]})
    rc, sleeps = loop(fake)
    assert rc == 0 and sleeps == [5.0, 5.0, 5.0]  # while queued, and while each create provisions
    assert fake.verbs == ["describe", "create", "describe", "describe", "install", "run",  # preempted: exit 75
                          "describe", "describe", "delete", "describe", "create", "describe", "install", "run"]
    assert not fake.states and not any(fake.codes.values())


def test_tpu_queued_reruns_on_a_live_slice_and_stops_on_what_a_rerun_repeats():
    # A storage failure (74) on a slice still ACTIVE: the command runs again there, nothing is recreated.
    fake = FakeGcloud(states=["ACTIVE", "ACTIVE", "ACTIVE"], codes={"install": [0, 0], "run": [74, 0]})
    assert loop(fake) == (0, [])
    assert "create" not in fake.verbs and "delete" not in fake.verbs
    # A bad config (2) on an ACTIVE slice: stop with it.
    fake = FakeGcloud(states=["ACTIVE", "ACTIVE"], codes={"install": [0], "run": [2]})
    assert loop(fake)[0] == 2 and fake.verbs == ["describe", "install", "run", "describe"]
    # Preempted every time: give up after --max-restarts reruns with the last exit code.
    fake = FakeGcloud(states=["ACTIVE"] * 4, codes={"install": [0, 0], "run": [75, 75]})
    assert loop(fake, "--max-restarts", "1")[0] == 75 and fake.verbs.count("run") == 2


def test_dockerfile_installs_the_tpu_extra_of_setup_py():
    """The image installs the package with the `tpu` extra that setup.py defines (jax[tpu], hence libtpu), the
    extra tpu_pod.py installs on TPU VMs, on a Python setup.py supports; the launchers print its build command."""
    dockerfile = (LAUNCH / "Dockerfile").read_text()
    (install,) = re.findall(r"^RUN pip install .*$", dockerfile, flags=re.MULTILINE)
    assert re.search(r'"\.\[(\w+)\]"', install).group(1) == "tpu"
    tree = ast.parse((REPO / "setup.py").read_text())
    extras = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", "") == "EXTRAS_REQUIRE")
    tpu = extras.values[[ast.literal_eval(k) for k in extras.keys].index("tpu")]
    assert "jax[tpu]" in ast.unparse(tpu)
    assert load("tpu_pod").parse_args(["--tpu", "p", "--zone", "z"]).extras == "tpu"
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, flags=re.MULTILINE).group(1)
    assert f"Programming Language :: Python :: {python}" in (REPO / "setup.py").read_text()
    for copied in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.MULTILINE):
        assert all((REPO / path).exists() for path in copied.split()), copied
    common = load("launch_common")
    assert common.DOCKERFILE == "launch/Dockerfile" and (REPO / common.DOCKERFILE).exists()
    assert "ENV APRIEL_COMPILE_CACHE=" in dockerfile
    from apriel_jax.utils import compile_cache

    assert compile_cache.ENV == "APRIEL_COMPILE_CACHE"
