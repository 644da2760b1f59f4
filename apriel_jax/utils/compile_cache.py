"""JAX's persistent compilation cache for ``apriel-jax train`` and ``apriel-jax pipeline``.

Why: a preempted pod job restarts from its last checkpoint, and without a cache every restart compiles
the model init and the train step again before its first step (65-90 s for one 15B stage's train step when
``apriel-jax aot`` compiles it for a v5p slice on a CPU host, see README).
JAX can keep every compiled executable in a directory, keyed by the program, the compile options, the
devices and the jax/XLA versions; a restarted run on the same hardware reads them back instead of compiling.
The directory may be local or ``gs://`` (JAX opens it through ``etils.epath``, like ``apriel_jax.storage``),
so a cache in the run's bucket survives the loss of every host.

Where it is (a run config's or a pipeline config's ``compile_cache`` field):

* ``""`` (the default): ``$APRIEL_COMPILE_CACHE`` when set (e.g. by a container image), else
  ``RUN_DIR/compile_cache``: next to the checkpoints it belongs with;
* ``"none"``: off;
* anything else: that directory or ``gs://`` URL (e.g. one cache shared by several runs).

A pipeline resolves its cache once, under its own run_dir, and writes it into every stage's run config
(:func:`share_with_stages`): the stages share one cache instead of each starting an empty
``STAGE/run/compile_cache``.

Every executable is written, however fast it compiled and however small it is (JAX's defaults skip those
under 1 s of compile time, which would leave out every CPU program and many small TPU ones): JAX looks each
program up in the cache anyway once the cache is on, so a hit for a small one costs no more than its miss.

JAX opens the cache at the first compile and keeps it for the life of the process. :func:`configure` must
therefore run before the first compile; it only sets JAX options and touches no backend, so it can run
after ``apriel_jax.parallel.distributed.initialize`` (which must come before any backend use). When a later
run in the same process (tests, notebooks) names another directory, the open cache is reset so the next
compile opens the new one. Only process 0 writes entries (JAX's rule, against contending writes on GCS);
every process reads. A cache that cannot be read or written costs compile time only: JAX warns and compiles.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from apriel_jax import storage

OFF = "none"
ENV = "APRIEL_COMPILE_CACHE"
DIR_NAME = "compile_cache"


def resolve(setting: str, run_dir) -> storage.Location | None:
    """The cache directory a ``compile_cache`` setting names for a run in ``run_dir`` (None: off)."""
    chosen = setting or os.environ.get(ENV, "")
    if chosen == OFF:
        return None
    return storage.location(chosen or storage.location(run_dir) / DIR_NAME)


def configure(where: storage.Location | None) -> None:
    """Point JAX's persistent cache at ``where`` (None: turn it off), for the compiles that follow."""
    path = None if where is None else str(where)
    enabled = path is not None
    if path != jax.config.jax_compilation_cache_dir or enabled != jax.config.jax_enable_compilation_cache:
        compilation_cache.reset_cache()  # JAX would keep using the directory it opened first
    jax.config.update("jax_enable_compilation_cache", enabled)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size limit, none set for us


def configure_for_run(cfg) -> storage.Location | None:
    """Configure the cache of a run config (``compile_cache``, ``run_dir``); returns its directory."""
    where = resolve(cfg.compile_cache, cfg.run_dir)
    configure(where)
    return where


def share_with_stages(cfg) -> storage.Location | None:
    """Configure the pipeline's cache and make every train stage use it; returns its directory.

    A stage's own ``train.compile_cache`` must be unset (or already the pipeline's): one cache serves the
    whole pipeline, chosen by the pipeline's ``compile_cache``.
    """
    where = resolve(cfg.compile_cache, cfg.run_dir)
    setting = OFF if where is None else str(where)
    trained = {name: cfg.stages[name].train for name in cfg.order if cfg.stages[name].kind == "train"}
    for name, train in trained.items():  # all checked before any is changed
        if train.compile_cache not in ("", setting):
            raise ValueError(f"stages.{name}.train.compile_cache={train.compile_cache!r}: a pipeline's stages "
                             f"share its compile cache; set compile_cache (now {setting!r}) instead")
    for train in trained.values():
        train.compile_cache = setting
    configure(where)
    return where
