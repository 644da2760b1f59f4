"""The stage runner: stage configs (trainable sets, loss masks), averaging and merging, plans, resumption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from apriel_jax.checkpoint.orbax_io import load_state, save_model
from apriel_jax.model import create_model, get_preset, param_count
from apriel_jax.model.factory import abstract_model, param_path
from apriel_jax.stages.averaging import weighted_average
from apriel_jax.stages.config import averaged_steps, pipeline_config, stage, validate_pipeline
from apriel_jax.stages.demo import get_config as demo_config, shrink_to_smoke_size
from apriel_jax.stages.report import plan_text, stage_model_configs
from apriel_jax.stages.runner import stage_train_config
from apriel_jax.train import inputs
from apriel_jax.train.optimizer import trainable_param_counts

REPO = Path(__file__).resolve().parents[1]


def flat(state) -> dict:
    return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def group_sizes(model_cfg) -> dict:
    """Parameter count per group: vision, projector, decoder (layers + final norm), embeddings (embed + head)."""
    sizes = {}
    for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(abstract_model(model_cfg), nnx.Param)):
        name = param_path(p)
        key = "embeddings" if name.startswith(("decoder/embed", "decoder/lm_head")) else name.split("/")[0]
        sizes[key] = sizes.get(key, 0) + int(np.prod(x.shape))
    return sizes


# ------------------------------------------------------------------------------- stage configs


def test_demo_stages_train_the_papers_groups_with_the_papers_loss_masks():
    cfg = demo_config()
    validate_pipeline(cfg)
    models = stage_model_configs(cfg)
    expected = {  # stage: (trained groups, loss)
        "base": ({"vision", "projector", "decoder", "embeddings"}, "all"),
        "upscale": ({"vision", "projector", "decoder", "embeddings"}, "all"),
        "realign": ({"projector"}, "all"),
        "cpt1": ({"vision", "projector", "decoder", "embeddings"}, "all"),
        "cpt2": ({"projector", "decoder", "embeddings"}, "responses"),
        "sft_main": ({"decoder", "embeddings"}, "responses"),
        "sft_subset": ({"decoder", "embeddings"}, "responses"),
        "sft_long": ({"decoder", "embeddings"}, "responses"),
    }
    for name, (groups, loss) in expected.items():
        tcfg = stage_train_config(cfg, name, None)
        assert tcfg.data.loss == loss, name
        sizes = group_sizes(models[name])
        trainable, frozen = trainable_param_counts(models[name], tuple(tcfg.trainable))
        assert trainable == sum(sizes[g] for g in groups), name
        assert frozen == sum(v for g, v in sizes.items() if g not in groups), name
    assert models["upscale"].decoder.num_layers == 6 and models["base"].decoder.num_layers == 4
    assert cfg.stages.merge.kind == "merge" and sum(cfg.stages.merge.merge.weights) == 1.0


def test_responses_only_stages_mask_prompts_and_images():
    cfg = demo_config()
    tcfg = stage_train_config(cfg, "cpt2", None)
    tcfg.data.global_batch = 2
    it = iter(inputs.make_dataset(tcfg, tcfg.data.sources, seed=0))
    try:
        batch = next(it)
    finally:
        it.close()
    image = batch["tokens"] == tcfg.model.image_token_id
    assert image.any(), "CPT-2 rows carry images"
    assert batch["loss_mask"][image].sum() == 0, "image tokens never carry loss"
    real = batch["segment_ids"] > 0
    # Responses only: a small share of the real tokens (answers), never zero.
    share = batch["loss_mask"][real].mean()
    assert 0 < share < 0.3, share


def test_pipeline_config_errors_are_named():
    cfg = pipeline_config()
    cfg.order = ["a", "m"]
    cfg.stages.a = stage(init="previous")
    cfg.stages.m = stage("merge")
    cfg.stages.m.merge.update(stages=["a", "a"], weights=[0.5, 0.6])
    with pytest.raises(ValueError) as e:
        validate_pipeline(cfg)
    assert "stages.a.init='previous' but it is the first stage" in str(e.value)
    assert "sum to 1.1, not 1" in str(e.value)
    cfg.stages.a.init = "random"
    cfg.stages.m.merge.weights = [0.5, 0.5]
    cfg.stages.a.finalize.update(kind="average", num_checkpoints=4, interval=30)
    cfg.stages.a.train.steps = 100
    cfg.stages.a.train.checkpoint.save_every = 10
    with pytest.raises(ValueError, match="4 checkpoints 30 steps apart need more than 100 steps"):
        validate_pipeline(cfg)
    cfg.stages.a.finalize.interval = 25
    with pytest.raises(ValueError, match="must be a multiple of train.checkpoint.save_every=10"):
        validate_pipeline(cfg)
    cfg.stages.a.finalize.interval = 20
    validate_pipeline(cfg)
    assert averaged_steps(cfg.stages.a) == [40, 60, 80, 100]


def test_production_plan_counts_the_15b_model():
    from apriel_jax.utils.config_cli import load_config_file

    cfg = load_config_file(str(REPO / "configs/pipelines/apriel_15b.py"))
    text = plan_text(cfg)
    models = stage_model_configs(cfg)
    assert models["upscale"].decoder.num_layers == 48
    assert param_count(models["cpt1"]) == 14_863_859_712
    for name in cfg.order:
        assert f"\n{name} " in text
    assert "avg6@" in text and "avg3@" in text and "32768" in text and "49152" in text


# ------------------------------------------------------------------------------- averaging


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    cfg = get_preset("tiny")
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for seed in (0, 1):
        dirs.append(save_model(nnx.state(create_model(cfg, seed=seed)), cfg, root / f"m{seed}"))
    return cfg, dirs


def test_average_of_identical_checkpoints_is_the_checkpoint(tiny_models, tmp_path):
    cfg, (a, _) = tiny_models
    out = weighted_average([a, a, a], [1 / 3] * 3, cfg, tmp_path / "avg", group_bytes=4096)
    got, want = flat(load_state(out, cfg)), flat(load_state(a, cfg))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=4e-7, atol=0, err_msg=k)


def test_weighted_merge_on_a_mesh(tiny_models, tmp_path):
    cfg, (a, b) = tiny_models
    from apriel_jax.parallel.mesh import make_mesh

    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1})
    out = weighted_average([a, b], [0.25, 0.75], cfg, tmp_path / "merged", mesh=mesh)
    got, wa, wb = flat(load_state(out, cfg)), flat(load_state(a, cfg)), flat(load_state(b, cfg))
    for k in wa:
        np.testing.assert_allclose(got[k], 0.25 * wa[k] + 0.75 * wb[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_merge_weights_must_sum_to_one_and_shapes_must_match(tiny_models, tmp_path):
    cfg, (a, b) = tiny_models
    with pytest.raises(ValueError, match="sum to 1"):
        weighted_average([a, b], [0.5, 0.6], cfg, tmp_path / "x")
    other = get_preset("tiny")
    other.decoder.num_layers = 3
    c = save_model(nnx.state(create_model(other, seed=0)), other, tmp_path / "three_layers")
    with pytest.raises(ValueError, match="mis-shaped.*decoder/layers"):
        weighted_average([a, c], [0.5, 0.5], cfg, tmp_path / "y")
    assert not (tmp_path / "y").exists() and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------- running pipelines


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


def _pipeline(config, run_dir, *extra, **popen):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cmd = [sys.executable, "-m", "apriel_jax.cli", "pipeline", str(config), f"--config.run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _export_bytes(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "export" / "hf").glob("*.safetensors"))}


def test_killed_pipeline_resumes_to_the_same_export(tmp_path):
    config = tmp_path / "mini.py"
    config.write_text(MINI_PIPELINE)
    straight = _pipeline(config, tmp_path / "a")
    out, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert [s["stage"] for s in summary] == ["base", "upscale", "sft_a", "sft_b", "merge"]
    assert summary[1]["averaged_steps"] == [4, 6]
    assert (tmp_path / "a" / "curves.png").stat().st_size > 0

    # Kill (SIGKILL) in the middle of the upscale stage, after its first checkpoint, then rerun.
    killed = _pipeline(config, tmp_path / "b", "--config.stages.upscale.train.debug.step_sleep_s=1.5")
    ckpt = tmp_path / "b" / "upscale" / "run" / "checkpoints"
    deadline = time.time() + 600
    while not (ckpt / "2").is_dir() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.2)
    assert killed.poll() is None, killed.communicate()[0]
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert (tmp_path / "b" / "base" / "DONE.json").is_file()
    assert not (tmp_path / "b" / "upscale" / "DONE.json").is_file()
    resumed = _pipeline(config, tmp_path / "b")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out
    assert "[base] finished earlier" in out
    a, b = _export_bytes(tmp_path / "a"), _export_bytes(tmp_path / "b")
    assert a and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), "resumed pipeline exported different weights"


def test_demo_pipeline_runs_end_to_end_in_a_bucket_and_exports_for_transformers(gcs_root, tmp_path, monkeypatch,
                                                                                  capsys):
    """The main job's config with every stage cut to a few steps, as a pod job runs it: everything in a
    bucket (a GCS API server on loopback). All stages run, finals chain, the export (downloaded, as a user
    would) loads in transformers with the same logits. The killed-and-resumed pipeline test below runs the
    same config on local disk."""
    from apriel_jax import storage
    from apriel_jax.cli_pipeline import run_and_report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APRIEL_CACHE_DIR", str(tmp_path / "cache"))
    run = f"{gcs_root}/demo"
    cfg = demo_config()
    cfg.run_dir = run
    cfg.mesh.update(fsdp=4, tensor=2)  # every stage also runs tensor-parallel
    shrink_to_smoke_size(cfg, averaged_save_every=2)  # averaged stages: checkpoints at 2, 4, 6
    assert run_and_report(cfg) == 0
    out = capsys.readouterr().out
    assert "transformers check: LlavaForConditionalGeneration loads it" in out
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert [s["stage"] for s in summary] == list(cfg.order)
    by_name = {s["stage"]: s for s in summary}
    assert by_name["upscale"]["averaged_steps"] == [2, 4, 6]
    assert by_name["realign"]["trainable_params"] < by_name["cpt2"]["trainable_params"]
    assert by_name["cpt2"]["counting_accuracy_end"] is not None
    for name in cfg.order:  # each stage's result behind its markers
        assert storage.location(f"{run}/{name}/DONE.json").is_file()
        assert storage.location(f"{run}/{name}/final/apriel_config.json").is_file()
    export = storage.location(f"{run}/export/hf")
    assert json.loads((export / "config.json").read_text())["text_config"]["num_hidden_layers"] == 6
    assert (export / "tokenizer.json").is_file()
    assert json.loads((export / "EXPORTED_FROM.json").read_text())["source"] == f"{run}/{cfg.order[-1]}/final"
    assert storage.read_bytes(f"{run}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "gs:").exists()  # nothing went to a local folder named after the URL
