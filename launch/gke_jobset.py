#!/usr/bin/env python3
"""A GKE JobSet manifest for (multi-slice) TPU training that survives preemption, and the matching xpk command.

    python launch/gke_jobset.py --name apriel-15b --accelerator v5p --topology 4x4x4 \\
        --image us-docker.pkg.dev/PROJECT/REPO/apriel-jax:latest --out jobset.yaml [--dry-run] \\
        --pipeline configs/pipelines/apriel_15b.py:gs://BUCKET/apriel-data \\
        -- --config.run_dir=gs://BUCKET/runs/apriel-15b

Every host runs ``apriel-jax pipeline CONFIG`` (``--pipeline``) with the options after ``--``, or the whole
command after ``--`` when it starts with a program (``-- apriel-jax train configs/train/tiny_text.py ...``).

One replicated job of ``--num-slices`` replicas; each replica is one slice: a Job of one pod per TPU VM
host, on a node pool with the slice's accelerator and topology (the exclusive-topology annotation keeps
one slice per node pool). GKE's TPU webhook gives every pod TPU_WORKER_ID / TPU_WORKER_HOSTNAMES, from
which ``jax.distributed`` finds the processes of its slice (``distributed.mode=auto``); with several
slices the MEGASCALE_* variables join the slices over the data-center network (DCN), with slice 0's
first pod as coordinator. Several slices also need a DCN mesh degree: unless the command sets
``mesh_dcn``, ``--config.mesh_dcn.data=<num slices>`` is appended to an ``apriel-jax train`` or
``pipeline`` command.

Preemption: a failed pod (a preempted or lost host, exit 75 after SIGTERM) restarts the whole JobSet, up to
``--max-restarts`` times, and the rerun resumes from the last checkpoint in the bucket (finished pipeline
stages are skipped). Exit codes a rerun would only repeat (2 bad config or storage access, 3 diverged, 65
bad data) fail the JobSet at once instead (a pod failure policy plus a JobSet failure rule). Pods get
``--grace-period-s`` after SIGTERM to finish the step in flight and save a checkpoint.

Without ``--dry-run`` the manifest is written to ``--out``. Either way the ``docker build`` / ``docker push``
of ``--image`` (from ``launch/Dockerfile``) and the ``kubectl apply`` (and, with ``--xpk-cluster``, ``xpk
workload create``) commands are printed, not run: submitting is one line.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from pathlib import Path

# launch/ is not a package: make the sibling helper importable however this file is run or imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_common import (
    COMMAND_EPILOG,
    DOCKERFILE,
    NOT_RESUMABLE_EXIT_CODES,
    LaunchError,
    add_pipeline_argument,
    image_commands,
    launched_command,
    main_wrapper,
    positive,
    shell,
    split_command,
    to_yaml,
)

# accelerator -> (GKE node label cloud.google.com/gke-tpu-accelerator, topology dimensions, xpk/gcloud name
# prefix, TPU cores per chip: v4/v5p types are named by cores, v5e/v6e by chips).
ACCELERATORS = {
    "v4": ("tpu-v4-podslice", 3, "v4", 2),
    "v5p": ("tpu-v5p-slice", 3, "v5p", 2),
    "v5e": ("tpu-v5-lite-podslice", 2, "v5litepod", 1),
    "v6e": ("tpu-v6e-slice", 2, "v6e", 1),
}
CHIPS_PER_HOST = 4  # multi-host slices of every generation above; smaller slices sit on one host
MEGASCALE_PORT = 8080
# Seconds a pod has between SIGTERM and SIGKILL. Sized for saving the 15B train state: fp32 parameters plus
# Adam's two fp32 moments are 15e9 x 12 bytes = 180 GB, 11 GB per host of a v5p-128 (16 hosts); at a
# pessimistic 100 MB/s per host to GCS that is under 2 minutes, plus the step in flight and orbax's commit.
GRACE_PERIOD_S = 300
MAX_RESTARTS = 10


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch/gke_jobset.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=COMMAND_EPILOG)
    p.add_argument("--name", required=True, help="JobSet / workload name (DNS label)")
    p.add_argument("--accelerator", required=True, choices=sorted(ACCELERATORS))
    p.add_argument("--topology", required=True, help="chips per slice as AxB (v5e, v6e) or AxBxC (v4, v5p)")
    p.add_argument("--num-slices", type=positive, default=1)
    p.add_argument("--image", required=True,
                   help=f"container image built from {DOCKERFILE} (apriel-jax with jax[tpu]); "
                        "the build and push commands are printed")
    p.add_argument("--namespace", default="default")
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                   help="JobSet restarts after a failed pod (a preempted or lost host); each rerun resumes from "
                        f"the last checkpoint (default: {MAX_RESTARTS}). Exit codes "
                        f"{', '.join(map(str, NOT_RESUMABLE_EXIT_CODES))} fail the JobSet without restarting")
    p.add_argument("--grace-period-s", type=positive, default=GRACE_PERIOD_S,
                   help="terminationGracePeriodSeconds: time between SIGTERM and SIGKILL to finish the step and "
                        f"save (default: {GRACE_PERIOD_S}: a 15B train state, params + Adam in fp32 = 180 GB, is "
                        "11 GB per host of a v5p-128, under 2 minutes at a pessimistic 100 MB/s per host to GCS, "
                        "plus the step in flight). A Spot node's own preemption notice may be shorter")
    p.add_argument("--workdir", default="/app", help="working directory in the container")
    p.add_argument("--out", default="jobset.yaml", help="manifest path")
    p.add_argument("--xpk-cluster", default="", help="also print an `xpk workload create` command for this cluster")
    p.add_argument("--project", default="", help="for the xpk command")
    p.add_argument("--zone", default="", help="for the xpk command")
    p.add_argument("--dry-run", action="store_true", help="print the manifest and commands; write nothing")
    add_pipeline_argument(p)
    return p.parse_args(argv)


def slice_shape(accelerator: str, topology: str) -> tuple[int, int, int]:
    """(chips, hosts, chips per host) of one slice; a clear error for a malformed topology."""
    dims = ACCELERATORS[accelerator][1]
    if not re.fullmatch(r"\d+(x\d+)*", topology) or topology.count("x") + 1 != dims:
        example = "4x4x4" if dims == 3 else "16x16"
        raise LaunchError(f"--topology {topology!r}: {accelerator} topologies have {dims} dimensions, e.g. {example}")
    chips = math.prod(int(d) for d in topology.split("x"))
    if chips < 1:
        raise LaunchError(f"--topology {topology!r} has no chips")
    per_host = min(chips, CHIPS_PER_HOST if chips > 8 or dims == 3 else chips)
    if chips % per_host:
        raise LaunchError(f"--topology {topology!r}: {chips} chips do not fill hosts of {per_host} chips")
    return chips, chips // per_host, per_host


def train_command(args, command: list[str]) -> str:
    text = launched_command(args.pipeline, command)
    if args.num_slices > 1 and re.search(r"\bapriel-jax (train|pipeline)\b", text) and "mesh_dcn" not in text:
        text += f" --config.mesh_dcn.data={args.num_slices}"  # data parallelism across slices (DCN)
    return text


def manifest(args, command: str) -> dict:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", args.name):
        raise LaunchError(f"--name {args.name!r} must be a DNS label: lowercase letters, digits, dashes (<= 40)")
    label, _, _, _ = ACCELERATORS[args.accelerator]
    _, hosts, per_host = slice_shape(args.accelerator, args.topology)
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if args.num_slices > 1:
        env += [
            # JobSet pod hostnames are <jobset>-<replicated job>-<job index>-<pod index>.<jobset>.
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{args.name}-slice-0-0.{args.name}"},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(args.num_slices)},
            {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
            {"name": "MEGASCALE_SLICE_ID",
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}},
        ]
    container = {
        "name": "apriel-jax",
        "image": args.image,
        "workingDir": args.workdir,
        "command": ["bash", "-c", command],
        "env": env,
        "ports": [{"containerPort": 8471}, {"containerPort": MEGASCALE_PORT}, {"containerPort": 8476}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": per_host}},
    }
    pod = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": args.grace_period_s,
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": label,
                         "cloud.google.com/gke-tpu-topology": args.topology},
        "containers": [container],
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": args.name, "namespace": args.namespace,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {
                "maxRestarts": args.max_restarts,
                # A Job failed by its pod failure policy (an exit code a rerun cannot fix) fails the JobSet.
                "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{
                "name": "slice",
                "replicas": args.num_slices,
                "template": {"spec": {
                    "parallelism": hosts, "completions": hosts, "backoffLimit": 0,
                    "podFailurePolicy": {"rules": [{
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "apriel-jax", "operator": "In",
                                        "values": list(NOT_RESUMABLE_EXIT_CODES)},
                    }]},
                    "template": {"spec": pod},
                }},
            }],
        },
    }


def xpk_command(args, command: str) -> list[str]:
    _, _, prefix, cores_per_chip = ACCELERATORS[args.accelerator]
    chips, _, _ = slice_shape(args.accelerator, args.topology)
    argv = ["xpk", "workload", "create", f"--cluster={args.xpk_cluster}", f"--workload={args.name}",
            f"--tpu-type={prefix}-{chips * cores_per_chip}", f"--num-slices={args.num_slices}",
            f"--docker-image={args.image}", f"--command={command}", f"--max-restarts={args.max_restarts}",
            f"--termination-grace-period-seconds={args.grace_period_s}",
            # xpk restarts after infrastructure failures only unless told otherwise; a preempted run exits 75.
            "--restart-on-user-code-failure"]
    argv += [f"--project={args.project}"] if args.project else []
    return argv + ([f"--zone={args.zone}"] if args.zone else [])


def main(argv) -> int:
    argv, command = split_command(argv)
    args = parse_args(argv)
    text = train_command(args, command)
    doc = to_yaml(manifest(args, text))
    apply = ["kubectl", "apply", "-f", args.out]
    lines = [shlex.join(apply)] + ([shlex.join(xpk_command(args, text))] if args.xpk_cluster else [])
    if args.dry_run:
        print(f"# {args.out} (not written: --dry-run)\n{doc}---")
    else:
        Path(args.out).write_text(doc)
        print(f"wrote {args.out}")
    print("# build and push the image (at the repository root), then submit:")
    print("\n".join([shell(c) for c in image_commands(args.image)] + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main_wrapper(main))
