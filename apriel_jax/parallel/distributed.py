"""Multi-process (multi-host) start-up and the few host-level agreements a multi-process run needs.

:func:`initialize` wires ``jax.distributed.initialize`` from the run config's ``distributed`` section or
the environment. It must run before anything touches a JAX backend (``jax.devices()``, any computation);
``apriel-jax train`` calls it first thing, and ``train(cfg)`` calls it again (a no-op once initialized).

Where the process layout comes from with ``distributed.mode = "auto"``, first match wins:

1. ``env``: ``distributed.num_processes > 0`` in the config or ``APRIEL_NUM_PROCESSES`` in the
   environment; the coordinator (``host:port`` of process 0) and this process's id come from
   ``distributed.coordinator_address`` / ``distributed.process_id`` or ``APRIEL_COORDINATOR_ADDRESS`` /
   ``APRIEL_PROCESS_ID``. Local multi-process CPU runs and hand-rolled GPU clusters use this.
2. ``slurm``: inside an ``srun`` step with more than one task (``SLURM_STEP_NUM_TASKS``; the batch script
   itself is one task even when the job has many, so ``SLURM_NTASKS`` is not used): id ``SLURM_PROCID``,
   coordinator ``APRIEL_COORDINATOR_ADDRESS`` if set, else the first node of ``SLURM_STEP_NODELIST`` (or
   ``SLURM_JOB_NODELIST``) at ``distributed.port``.
3. ``tpu``: a TPU host (``/dev/accel*`` or ``/dev/vfio`` device nodes), or the environment of a
   multi-host TPU workload (GKE: several ``TPU_WORKER_HOSTNAMES``, ``MEGASCALE_COORDINATOR_ADDRESS``):
   ``jax.distributed.initialize()`` without arguments, JAX reads the TPU metadata itself.
4. otherwise one process: nothing to do.

``mode`` may also name one of ``env`` / ``slurm`` / ``tpu`` to require it, or ``off``.

A missing process does not raise inside JAX: its coordination client aborts the whole process with a
C++ stack trace once the deadline passes. A watchdog thread (the GIL is released while JAX waits) exits
first with :data:`EXIT_MISSING_PROCESS` and a message naming the coordinator and the expected count.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from apriel_jax.utils.platform import has_tpu_devices

MODES = ("auto", "off", "env", "slurm", "tpu")
DEFAULT_PORT = 8476
EXIT_MISSING_PROCESS = 69  # EX_UNAVAILABLE: a process of the run never reached the coordinator
# JAX's own deadline is set past the watchdog's, so the clear message always comes first.
_JAX_DEADLINE_MARGIN_S = 30

ENV_COORDINATOR = "APRIEL_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "APRIEL_NUM_PROCESSES"
ENV_PROCESS_ID = "APRIEL_PROCESS_ID"


@dataclass(frozen=True)
class Options:
    """The ``distributed`` section of a run config (see ``train.config.train_config``)."""

    mode: str = "auto"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    port: int = DEFAULT_PORT
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100
    cpu_collectives: str = "gloo"

    @classmethod
    def of(cls, cfg_or_options) -> Options:
        """From a run config (its ``distributed`` section), that section, a dict, Options or None."""
        if cfg_or_options is None:
            return cls()
        if isinstance(cfg_or_options, cls):
            return cfg_or_options
        section = cfg_or_options
        known = cls.__dataclass_fields__
        if "distributed" in section:
            section = section["distributed"]
        elif not set(section) & set(known):  # a run config without a distributed section: defaults
            return cls()
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f"distributed: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: section[k] for k in section})


@dataclass(frozen=True)
class Plan:
    """How this process joins the run; ``coordinator``/``num_processes``/``process_id`` are None in TPU
    mode (JAX detects them)."""

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``."""
    depth, first = 0, ""
    for ch in nodelist.strip():  # the first top-level comma ends the first entry
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        first += ch
    # Each bracket group stands for its first member: its first comma item, its first range bound
    # (zero padding as written).
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read the first host of SLURM node list {nodelist!r}")
    return host


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _tpu_environment(env: Mapping[str, str]) -> bool:
    # apriel_jax.utils.platform sets TPU_WORKER_HOSTNAMES=localhost on hosts without TPUs: one host.
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1 or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS")) or has_tpu_devices()


def _env_plan(opts: Options, env: Mapping[str, str]) -> Plan:
    count = opts.num_processes if opts.num_processes > 0 else (
        _int_env(env, ENV_NUM_PROCESSES) if env.get(ENV_NUM_PROCESSES) else 0)
    pid = opts.process_id if opts.process_id >= 0 else (
        _int_env(env, ENV_PROCESS_ID) if env.get(ENV_PROCESS_ID) else -1)
    coordinator = opts.coordinator_address or env.get(ENV_COORDINATOR, "")
    missing = [what for what, bad in (
        (f"the process count (distributed.num_processes or {ENV_NUM_PROCESSES})", count < 1),
        (f"this process's id (distributed.process_id or {ENV_PROCESS_ID})", pid < 0),
        (f"the coordinator host:port (distributed.coordinator_address or {ENV_COORDINATOR})", not coordinator),
    ) if bad]
    if missing:
        raise ValueError("multi-process run: missing " + "; ".join(missing))
    if not pid < count:
        raise ValueError(f"process id {pid} is not below the process count {count}")
    if ":" not in coordinator:
        raise ValueError(f"coordinator address {coordinator!r} must be host:port")
    return Plan("env", coordinator, count, pid)


def _slurm_plan(opts: Options, env: Mapping[str, str]) -> Plan:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "SLURM_PROCID" not in env or not nodelist:
        raise ValueError("distributed.mode='slurm' needs SLURM_PROCID and SLURM_STEP_NODELIST/SLURM_JOB_NODELIST "
                         "(run the command under srun)")
    count = _int_env(env, "SLURM_STEP_NUM_TASKS") if env.get("SLURM_STEP_NUM_TASKS") else _int_env(env, "SLURM_NTASKS")
    # The sbatch script may export the coordinator (scontrol expands the node list authoritatively).
    coordinator = (opts.coordinator_address or env.get(ENV_COORDINATOR)
                   or f"{first_slurm_host(nodelist)}:{opts.port}")
    return Plan("slurm", coordinator, count, _int_env(env, "SLURM_PROCID"))


def resolve(cfg_or_options=None, environ: Mapping[str, str] | None = None) -> Plan | None:
    """The plan for this process, or None for a single-process run (pure: reads only ``environ``)."""
    opts = Options.of(cfg_or_options)
    env = os.environ if environ is None else environ
    if opts.mode not in MODES:
        raise ValueError(f"distributed.mode={opts.mode!r} is not one of {MODES}")
    mode = opts.mode
    if mode == "auto":
        if opts.num_processes > 0 or env.get(ENV_NUM_PROCESSES):
            mode = "env"
        elif env.get("SLURM_STEP_NUM_TASKS") and _int_env(env, "SLURM_STEP_NUM_TASKS") > 1:
            mode = "slurm"
        elif _tpu_environment(env):
            mode = "tpu"
        else:
            return None
    if mode == "off":
        return None
    if mode == "tpu":
        return Plan("tpu")
    plan = _env_plan(opts, env) if mode == "env" else _slurm_plan(opts, env)
    return None if plan.num_processes == 1 else plan


def _watchdog(plan: Plan, timeout_s: int) -> threading.Event:
    done = threading.Event()

    def watch():
        if done.wait(timeout_s):
            return
        expected = f"{plan.num_processes} processes" if plan.num_processes else "the TPU workers (from TPU metadata)"
        where = plan.coordinator or "detected by JAX from TPU metadata"
        sys.stderr.write(
            f"\nERROR: jax.distributed.initialize did not complete within {timeout_s}s: this is process "
            f"{plan.process_id if plan.process_id is not None else '?'}, waiting for {expected} at coordinator "
            f"{where} (mode {plan.mode}). A process is missing or cannot reach the coordinator: check that "
            f"every process was started with the same coordinator address and process count, that process 0 "
            f"runs on the coordinator host, and that its port is open. Exiting with code {EXIT_MISSING_PROCESS}.\n")
        sys.stderr.flush()
        os._exit(EXIT_MISSING_PROCESS)  # JAX's client would abort the process with a C++ trace instead

    threading.Thread(target=watch, name="distributed-init-watchdog", daemon=True).start()
    return done


def initialize(cfg_or_options=None, environ: Mapping[str, str] | None = None) -> Plan | None:
    """Join the multi-process run described by the config/environment; None (nothing done) for one process.

    Safe to call again: once JAX's distributed system is up it returns without doing anything.
    """
    import jax

    plan = resolve(cfg_or_options, environ)
    if plan is None or jax.distributed.is_initialized():
        return plan
    opts = Options.of(cfg_or_options)
    if opts.cpu_collectives:
        # Cross-process collectives of CPU devices (local multi-process runs, and the host-side gathers
        # below); without it a CPU computation spanning processes fails. Must precede backend creation.
        jax.config.update("jax_cpu_collectives_implementation", opts.cpu_collectives)
    timeout = int(opts.initialization_timeout_s)
    done = _watchdog(plan, timeout)
    try:
        # A process that dies (SIGKILL, a lost host) is noticed when it misses heartbeats for this long:
        # then the coordination service takes every other process down with it.
        deadlines = dict(initialization_timeout=timeout + _JAX_DEADLINE_MARGIN_S,
                         heartbeat_timeout_seconds=int(opts.heartbeat_timeout_s))
        if plan.mode == "tpu":
            jax.distributed.initialize(**deadlines)
        else:
            jax.distributed.initialize(plan.coordinator, plan.num_processes, plan.process_id,
                                       cluster_detection_method="deactivate", **deadlines)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError("apriel_jax.parallel.distributed.initialize must run before any other JAX use "
                               "(jax.devices(), any computation): call it first thing in the program") from e
        raise
    finally:
        done.set()
    return plan


# --- Host-level agreements between processes (no-ops for a single process). ---

def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's ``data``, indexed by process (a collective: every process must call it)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [data]
    sizes = multihost_utils.process_allgather(np.array([len(data)], np.int64))[:, 0]
    # Padded to a power of two so repeated gathers of similar sizes reuse one compiled gather.
    width = 1 << max(10, int(sizes.max()).bit_length())
    buf = np.zeros(width, np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    gathered = multihost_utils.process_allgather(buf)
    return [gathered[p, :int(n)].tobytes() for p, n in enumerate(sizes)]


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (e.g. SIGTERM reached only some hosts: all
    must stop at the same step, or the others wait forever in the next step's collectives)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32)).any())


def _flatten(tree, prefix="") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_same_config(cfg) -> None:
    """Raise ValueError naming the processes (and keys) whose resolved run config differs from process 0's.

    ``distributed.*`` is left out: the process id may legitimately be set per process there.
    """
    import jax

    from apriel_jax.utils.config_cli import config_to_json

    if jax.process_count() == 1:
        return
    resolved = json.loads(config_to_json(cfg))
    resolved.pop("distributed", None)
    text = json.dumps(resolved, sort_keys=True)
    digests = allgather_bytes(hashlib.sha256(text.encode()).digest())
    differing = [p for p, d in enumerate(digests) if d != digests[0]]
    if not differing:
        return
    # Rare path: gather the configs themselves to say what differs.
    configs = [_flatten(json.loads(b)) for b in allgather_bytes(text.encode())]
    details = []
    for p in differing:
        keys = sorted(k for k in set(configs[0]) | set(configs[p]) if configs[0].get(k) != configs[p].get(k))
        details.append(f"process {p} differs in {keys[:8]}{' ...' if len(keys) > 8 else ''}")
    raise ValueError(f"processes disagree on the run config (sha256 of the resolved config JSON): "
                     f"process(es) {differing} differ from process 0: {'; '.join(details)}. Every process "
                     f"must run the same config file and overrides (only distributed.* may differ)")


# --- Several processes publishing one result (the stage runner, exports, model directories). ---

class PeerFailed(RuntimeError):
    """Another process of the job failed at a point where every process meets; this one stops too."""


class HostsDisagree(ValueError):
    """The processes of one job see different states (e.g. of the run directory)."""


@dataclass(frozen=True)
class Hosts:
    """This process's place in the job, for work where one process writes and the others wait: on a pod
    every host runs the same command, so markers, summaries and renames are done by process 0 (the
    primary) while every process takes part in the collective parts (orbax saves, gathers of sharded
    tensors). At each :meth:`sync` every process reports whether its part failed, so an error on one
    host stops all of them there instead of leaving the others waiting in the next collective."""

    index: int = 0
    count: int = 1

    @property
    def primary(self) -> bool:
        return self.index == 0

    def sync(self, what: str, error: BaseException | None = None) -> None:
        """Wait until every process reached this point. A process that arrives with ``error`` re-raises it
        itself (the caller's ``raise``); the others raise :class:`PeerFailed` naming it."""
        if self.count == 1:
            return
        status = b"" if error is None else (f"{type(error).__name__}: {error}".encode()[:4000] or b"failed")
        failed = [(p, s.decode(errors="replace")) for p, s in enumerate(allgather_bytes(status)) if s]
        if failed and error is None:
            p, message = failed[0]
            raise PeerFailed(f"process {p} of {self.count} failed while {what}: {message}")

    def on_primary(self, what: str, fn):
        """``fn()`` on the primary only; every process returns once it is done (its result on the primary,
        None elsewhere), and an error there is raised on every process."""
        result, error = None, None
        if self.primary:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 (re-raised below, after the others have heard of it)
                error = e
        self.sync(what, error)
        if error is not None:
            raise error
        return result

    def agree(self, what: str, value) -> None:
        """Stop every process with one message when the processes see different ``value`` (JSON), e.g.
        which stages are finished: a host with another view of the storage would run other work."""
        if self.count == 1:
            return
        mine = json.dumps(value, sort_keys=True)
        views = [b.decode() for b in allgather_bytes(mine.encode())]
        differing = [p for p, v in enumerate(views) if v != views[0]]
        if differing:
            raise HostsDisagree(f"processes disagree on {what}: process 0 sees {views[0][:300]}, process "
                             f"{differing[0]} sees {views[differing[0]][:300]}; every host must see the same "
                             "run directory (a shared bucket, not each host's local disk)")


def hosts() -> Hosts:
    """This process's :class:`Hosts` (one process when ``jax.distributed`` was not initialized; asking does
    not start a JAX backend then)."""
    import jax

    if not jax.distributed.is_initialized():
        return Hosts()
    return Hosts(jax.process_index(), jax.process_count())
