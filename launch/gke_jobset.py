#!/usr/bin/env python3
"""A GKE JobSet manifest for (multi-slice) TPU training, and the matching xpk command.

    python launch/gke_jobset.py --name apriel-cpt --accelerator v5p --topology 4x4x4 --num-slices 2 \\
        --image us-docker.pkg.dev/PROJECT/REPO/apriel-jax:latest --out jobset.yaml [--dry-run] \\
        -- apriel-jax train configs/train/tiny_text.py --config.run_dir=gs://BUCKET/runs/cpt

One replicated job of ``--num-slices`` replicas; each replica is one slice: a Job of one pod per TPU VM
host, on a node pool with the slice's accelerator and topology (the exclusive-topology annotation keeps
one slice per node pool). GKE's TPU webhook gives every pod TPU_WORKER_ID / TPU_WORKER_HOSTNAMES, from
which ``jax.distributed`` finds the processes of its slice (``distributed.mode=auto``); with several
slices the MEGASCALE_* variables join the slices over the data-center network (DCN), with slice 0's
first pod as coordinator. Several slices also need a DCN mesh degree: unless the command sets
``mesh_dcn``, ``--config.mesh_dcn.data=<num slices>`` is appended to an ``apriel-jax train`` command.

Without ``--dry-run`` the manifest is written to ``--out`` and the ``kubectl apply`` (and, with
``--xpk-cluster``, ``xpk workload create``) commands are printed, not run: submitting is one line.
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
    LaunchError,
    main_wrapper,
    positive,
    require_command,
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch/gke_jobset.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The command to run goes after --.")
    p.add_argument("--name", required=True, help="JobSet / workload name (DNS label)")
    p.add_argument("--accelerator", required=True, choices=sorted(ACCELERATORS))
    p.add_argument("--topology", required=True, help="chips per slice as AxB (v5e, v6e) or AxBxC (v4, v5p)")
    p.add_argument("--num-slices", type=positive, default=1)
    p.add_argument("--image", required=True, help="container image with apriel-jax and jax[tpu] installed")
    p.add_argument("--namespace", default="default")
    p.add_argument("--max-restarts", type=int, default=0, help="JobSet restarts after a failure (e.g. preemption)")
    p.add_argument("--workdir", default="/app", help="working directory in the container")
    p.add_argument("--out", default="jobset.yaml", help="manifest path")
    p.add_argument("--xpk-cluster", default="", help="also print an `xpk workload create` command for this cluster")
    p.add_argument("--project", default="", help="for the xpk command")
    p.add_argument("--zone", default="", help="for the xpk command")
    p.add_argument("--dry-run", action="store_true", help="print the manifest and commands; write nothing")
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
    text = require_command(command)
    if args.num_slices > 1 and "apriel-jax train" in text and "mesh_dcn" not in text:
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
            "failurePolicy": {"maxRestarts": args.max_restarts},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{
                "name": "slice",
                "replicas": args.num_slices,
                "template": {"spec": {"parallelism": hosts, "completions": hosts, "backoffLimit": 0,
                                      "template": {"spec": pod}}},
            }],
        },
    }


def xpk_command(args, command: str) -> list[str]:
    _, _, prefix, cores_per_chip = ACCELERATORS[args.accelerator]
    chips, _, _ = slice_shape(args.accelerator, args.topology)
    argv = ["xpk", "workload", "create", f"--cluster={args.xpk_cluster}", f"--workload={args.name}",
            f"--tpu-type={prefix}-{chips * cores_per_chip}", f"--num-slices={args.num_slices}",
            f"--docker-image={args.image}", f"--command={command}"]
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
        print(f"wrote {args.out}; submit with:")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main_wrapper(main))
