"""JAX's persistent compilation cache (apriel_jax.utils.compile_cache): where it goes, that a second run reads
every program the first one compiled (local and gs://), the off switch, and one cache for a pipeline."""

import jax
import jax.numpy as jnp
import pytest
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

from apriel_jax import storage
from apriel_jax.utils import compile_cache
from apriel_jax.utils.config_cli import apply_overrides

OPTIONS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
           "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True)
def restore_jax_options(monkeypatch):
    """Leave the process's JAX cache options as they were (other tests compile after these)."""
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    saved = {name: getattr(jax.config, name) for name in OPTIONS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


class CacheEvents:
    """Counts JAX's compilation-cache events while active: lookups, hits, and writes ("misses")."""

    NAMES = {"/jax/compilation_cache/compile_requests_use_cache": "lookups",
             "/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "writes"}

    def __enter__(self):
        self.counts = dict.fromkeys(self.NAMES.values(), 0)
        monitoring.register_event_listener(self._record)
        return self

    def _record(self, event, **kwargs):
        if event in self.NAMES:
            self.counts[self.NAMES[event]] += 1

    def __exit__(self, *exc):
        monitoring.unregister_event_listener(self._record)


def entries(where) -> set[str]:
    return {p.name for p in storage.location(where).iterdir() if p.name.endswith("-cache")}


def tiny_run(run_dir, **overrides):
    from apriel_jax.train.config import train_config

    cfg = train_config()
    cfg.run_dir = str(run_dir)
    cfg.steps = 2
    cfg.mesh.update(data=-1, fsdp=1)  # data parallel: the quickest step to compile on 8 CPU devices
    cfg.eval.every = 0
    cfg.log.update(tensorboard=False, console=False)
    cfg.update(overrides)
    return cfg


def test_a_second_run_reads_every_program_from_the_cache(tmp_path):
    from apriel_jax.train.loop import train

    first = tiny_run(tmp_path / "first")
    jax.clear_caches()  # nothing compiled in memory by earlier tests: the first run compiles every program
    with CacheEvents() as run1:
        assert train(first)["status"] == "completed"
    cache = tmp_path / "first" / "compile_cache"  # the default: next to the run's checkpoints
    written = entries(cache)
    assert any(name.startswith("jit_train_step-") for name in written)
    assert run1.counts["writes"] == len(written) and run1.counts["hits"] == 0

    jax.clear_caches()  # as in a new process
    second = tiny_run(tmp_path / "second", compile_cache=str(cache))  # a fresh run: no checkpoint to resume
    with CacheEvents() as run2:
        assert train(second)["status"] == "completed"
    assert run2.counts["lookups"] == run2.counts["hits"] > 0 and run2.counts["writes"] == 0
    assert entries(cache) == written
    assert not (tmp_path / "second" / "compile_cache").exists()


def test_cache_in_a_bucket(gcs_root):
    where = compile_cache.configure_for_run(tiny_run(f"{gcs_root}/run"))
    assert str(where) == f"{gcs_root}/run/compile_cache"
    triple = jax.jit(lambda x: 3 * x - 1)
    jax.clear_caches()  # every program of the call below is compiled, none found in memory
    with CacheEvents() as cold:
        assert float(triple(jnp.float32(2))) == 5.0
    written = cold.counts["writes"]
    assert written == cold.counts["lookups"] > 0 and len(entries(where)) == written

    jax.clear_caches()
    with CacheEvents() as warm:
        assert float(triple(jnp.float32(2))) == 5.0
    assert warm.counts == {"lookups": written, "hits": written, "writes": 0}


def test_off_switch_and_environment_default(tmp_path, monkeypatch):
    cfg = apply_overrides(tiny_run(tmp_path / "run"), ["--config.compile_cache=none"])
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "from_env"))
    assert compile_cache.configure_for_run(cfg) is None  # "none" wins over the environment
    with CacheEvents() as off:
        assert float(jax.jit(lambda x: x * 7 + 2)(jnp.float32(1))) == 9.0
    assert off.counts == {"lookups": 0, "hits": 0, "writes": 0}
    assert not (tmp_path / "run" / "compile_cache").exists() and not (tmp_path / "from_env").exists()

    cfg.compile_cache = ""  # the default: the environment's directory when set, else under the run dir
    assert compile_cache.resolve(cfg.compile_cache, cfg.run_dir) == storage.location(tmp_path / "from_env")
    monkeypatch.delenv(compile_cache.ENV)
    assert compile_cache.resolve(cfg.compile_cache, cfg.run_dir) == storage.location(tmp_path / "run/compile_cache")


def test_a_pipeline_shares_one_cache_with_its_stages(tmp_path):
    from apriel_jax.stages.demo import get_config
    from apriel_jax.stages.runner import stage_train_config

    cfg = get_config()
    cfg.run_dir = str(tmp_path / "pipe")
    where = compile_cache.share_with_stages(cfg)
    assert where == storage.location(tmp_path / "pipe" / "compile_cache")
    trained = [name for name in cfg.order if cfg.stages[name].kind == "train"]
    assert len(trained) > 1
    for name in trained:
        tcfg = stage_train_config(cfg, name, None)
        assert tcfg.run_dir != cfg.run_dir
        assert compile_cache.configure_for_run(tcfg) == where  # a stage's train() keeps the pipeline's cache
    assert jax.config.jax_compilation_cache_dir == str(where)

    cfg = get_config()
    cfg.run_dir = str(tmp_path / "pipe")
    cfg.stages[trained[1]].train.compile_cache = "/elsewhere"
    with pytest.raises(ValueError, match=rf"stages\.{trained[1]}\.train\.compile_cache='/elsewhere'"):
        compile_cache.share_with_stages(cfg)
    cfg.stages[trained[1]].train.compile_cache = ""
    cfg.compile_cache = "none"
    assert compile_cache.share_with_stages(cfg) is None
    assert {cfg.stages[name].train.compile_cache for name in trained} == {"none"}
    assert not jax.config.jax_enable_compilation_cache
