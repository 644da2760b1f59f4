"""The dress rehearsal of the 15B pod job (``launch/rehearse.py``): ``configs/pipelines/apriel_15b.py`` itself,
changed by command-line overrides only, run by 4 CPU processes the way a pod runs it, with its run directory
and data in a bucket (the GCS API server on loopback).

The full run (every stage and the export, checked in transformers) is marked slow: 4 processes on a 2-core
CI machine take longer than the suite's budget allows (``make test-slow`` runs it). The overrides are checked
against the config in every run of the suite, so the rehearsal cannot drift from the config unnoticed.
"""

import json
import sys
from pathlib import Path

import pytest

from apriel_jax import storage
from apriel_jax.cli_pipeline import load_pipeline_config
from apriel_jax.stages.config import averaged_steps, stage_steps, validate_pipeline
from apriel_jax.stages.report import plan_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import rehearse  # noqa: E402

STAGES = ["upscale", "realign", "cpt1", "cpt2", "sft_main", "sft_subset", "sft_long", "merge"]


def test_the_rehearsal_changes_the_15b_config_by_overrides_only(tmp_path):
    flags = rehearse.overrides(4, str(tmp_path / "base"), str(tmp_path / "run"))
    cfg = load_pipeline_config(f"{rehearse.CONFIG}:{tmp_path / 'data'}", [f for f in flags if "config.base=" not in f])
    validate_pipeline(cfg)
    assert list(cfg.order) == STAGES
    assert {n: stage_steps(cfg.stages[n]) for n in rehearse.STEPS} == rehearse.STEPS
    assert averaged_steps(cfg.stages.upscale) == [1, 2, 3, 4, 5, 6]
    assert averaged_steps(cfg.stages.cpt1) == [1, 2, 3]
    used = {p.rsplit("/", 1)[-1] for n in rehearse.STEPS for s in cfg.stages[n].train.data.sources
            for p in s["paths"]}
    assert used == set(rehearse.DATA)  # every folder the config reads is prepared, and nothing else
    assert "upscale→3L" in plan_text(cfg)


@pytest.mark.slow
def test_the_15b_config_runs_every_stage_on_four_processes_from_a_bucket(gcs_root, tmp_path):
    run, data = f"{gcs_root}/run", f"{gcs_root}/data"
    code = rehearse.main(["--out", str(tmp_path), "--run-dir", run, "--data-root", data])
    logs = {p.name: p.read_text() for p in sorted((tmp_path / "logs").iterdir())}
    assert code == 0, "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in logs.items())
    first = logs["process_0.log"]
    assert "transformers check: LlavaForConditionalGeneration loads it" in first
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert [s["stage"] for s in summary] == STAGES
    by_name = {s["stage"]: s for s in summary}
    assert by_name["upscale"]["averaged_steps"] == [1, 2, 3, 4, 5, 6]
    assert by_name["cpt1"]["averaged_steps"] == [1, 2, 3]
    assert by_name["realign"]["trainable_params"] < by_name["cpt2"]["trainable_params"]
    export = storage.location(f"{run}/export/hf")
    assert json.loads((export / "config.json").read_text())["text_config"]["num_hidden_layers"] == 3
    assert not (tmp_path / "gs:").exists()
