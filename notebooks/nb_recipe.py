"""04_recipe.ipynb: the Apriel-1.5 recipe, stage by stage, on the demo pipeline."""

from __future__ import annotations

from nb_cells import INSTALL_CELL, RUNTIME_CELL, code, header, md


STAGE_NOTES = {
    "base": """\
### `base`: stands in for Pixtral-12B

Apriel-1.5 starts from **Pixtral-12B** (a 40-layer Mistral-NeMo-style decoder behind Pixtral's vision
encoder), not from scratch. The demo has no pretrained model to start from, so this stage makes one: a
random tiny model trained briefly on templated text (arithmetic and scene descriptions). That text is the
"original pretraining distribution" that later stages replay.

Frozen: nothing. Data: generated text. Why: every later stage needs a model that already knows
something worth keeping.""",
    "upscale": """\
### `upscale`: depth upscaling 40 → 48 layers (demo: 4 → 6)

The paper grows the decoder from 40 to 48 layers by duplicating intermediate layers, then trains the
whole model on text, **half of it replayed** from the original distribution so the new depth does not
cost what the base knew. The copies here start as identity blocks (output projections zeroed), so the
upscaled model initially computes exactly what the source did. The stage ends with **checkpoint
averaging**: the paper averages six equispaced checkpoints with equal weights (demo: three), which
smooths the end of the run at no training cost.

Frozen: nothing. Data: 50% new text, 50% replay (demo: 40% new generated text, 10% shipped text, 50%
replay).""",
    "realign": """\
### `realign`: projector realignment

After upscaling, the decoder's hidden states have moved, so the 2-layer projector that maps vision
features into the decoder is retrained alone on multimodal data (captioning, instructions, documents),
with the **vision encoder and the decoder frozen**. It is cheap (the projector is ~31.5M of 14.9B
parameters at full size) and gives the next stage a model whose image tokens make sense again.

Frozen: vision, decoder, embeddings. Data: captions (the shipped `multimodal.jsonl`) and synthetic visual
tasks.""",
    "cpt1": """\
### `cpt1`: continual pretraining, stage 1

Everything is trained on a broad mix: **50% text, 20% replay, 30% multimodal** (documents, charts,
captions, OCR, ...), at **32k tokens** per sequence in the paper, with a cosine schedule (10% warmup) and
loss on all tokens. Three equispaced checkpoints are averaged at the end.

Frozen: nothing. Data (demo): 50% new generated text, 20% replay of the base's text, 30% synthetic visual
tasks, 384 tokens per row.""",
    "cpt2": """\
### `cpt2`: continual pretraining, stage 2: synthetic visual reasoning

Targeted visual skills from generated tasks with exact answers: image **reconstruction**, **matching**,
object **detection** and **counting** over procedurally rendered scenes. The **vision encoder is frozen**
(projector and decoder train) and the **loss is on the responses only** (the prompt and the image
tokens are not targets).

Demo: colour, shape and counting questions at 64×64 px, each answer class drawn uniformly. Held-out
accuracy is measured by greedy generation, printed beside the majority-answer baseline (the best a model
can do without looking) and a blind control: the same questions with blank images, where a model that
reads its answers off the image falls back to the baseline.""",
    "sft_main": """\
### `sft_main`: supervised fine-tuning with reasoning traces

Text-only SFT on instruction / reasoning data whose responses carry explicit reasoning ("Here are my
reasoning steps: ... [BEGIN FINAL RESPONSE] ... [END FINAL RESPONSE]"). Only the **decoder and the
embeddings** train; the vision tower and the projector are frozen (the multimodal ability comes from the
CPT stages). Loss on responses only.

Demo data: the shipped SFT chats (20%) and generated reasoning chats (80%).""",
    "sft_subset": """\
### `sft_subset` and `sft_long`: two runs on top of `sft_main`, then a merge

The paper trains two further SFT runs from the main SFT checkpoint: one on a **stratified subset** for
more epochs, one with **longer sequences** (49k tokens, with sequence parallelism at full size). Each
starts from `sft_main` (`init="stage:sft_main"`), not from the previous stage.""",
    "sft_long": """\
### `sft_long`

The long-context run: the demo doubles the row length (512 tokens) and mixes the shipped chats with
generated ones under another seed.""",
    "merge": """\
### `merge`: the final model

The released model is the **equal-weight average** of the two SFT runs' weights: no training, a
parameter-wise mean (streamed a few tensors at a time, fp32 accumulation).""",
}


def recipe():
    cells = [
        header("The Apriel-1.5 training recipe, stage by stage", """\
Apriel-1.5-15B-Thinker (arXiv 2510.01141) is Pixtral-12B made deeper and trained further in stages:
**depth upscaling → projector realignment → two continual-pretraining stages → SFT runs → merge**. In
apriel-jax the recipe is a **pipeline config**: a list of declarative stages (init, transform, frozen
groups, data mixture, length, schedule, finalize), executed by `apriel_jax.stages.runner.Runner`.

This notebook explains each stage, prints the plan of the tiny **demo pipeline** and of the full 15B
config, then runs the demo pipeline one stage at a time (minutes on a CPU), plots the loss curves,
prints the summary and exports the final model to Hugging Face format, checked against transformers.
The command-line equivalent is `apriel-jax pipeline` (and `apriel-jax pipeline --plan`)."""),
        code(INSTALL_CELL),
        code(RUNTIME_CELL),
        md("""\
## The plan of the demo pipeline

The demo keeps every architectural feature of Apriel at toy width (Pixtral-style vision tower with 2-D
RoPE, GELU projector, GQA decoder with decoupled head_dim) and runs every stage of the paper on data that
ships with the package or is generated. `plan_text` shows, per stage: where it starts, the transform,
the trained groups with trained / frozen parameter counts, the data mixture, sequence length, batch,
steps, tokens, schedule, loss and finalize (`avgN@steps`: the checkpoints averaged)."""),
        code("""\
from pathlib import Path

from apriel_jax.stages.demo import get_config as demo_config, shrink_to_smoke_size
from apriel_jax.stages.report import plan_text

cfg = demo_config()
cfg.run_dir = "runs/notebooks/recipe"
if SMOKE:  # CI: every stage cut to a few steps (averaged stages: 3 steps, each one checkpointed and averaged)
    shrink_to_smoke_size(cfg)
print(plan_text(cfg))"""),
        md("""\
## The plan at full size

`configs/pipelines/apriel_15b.py` is the same recipe for the 15B model, sized for TPU v5p pods: the
paper's sequence lengths, learning rates, schedules, frozen groups, mixture proportions, averaging and
merge. Batch sizes and token budgets are not published; the config marks the values it chose. The file is
in the repository, not in the installed package: it is found when apriel-jax was installed from a checkout
or from a git URL, which the install cell clones to `./apriel-jax` (running it needs the data shards and a
TPU pod; planning needs neither)."""),
        code("""\
import apriel_jax
from apriel_jax.utils.config_cli import load_config_file

candidates = [Path("configs/pipelines/apriel_15b.py"),
              Path(apriel_jax.__file__).resolve().parents[1] / "configs/pipelines/apriel_15b.py"]
found = next((p for p in candidates if p.is_file()), None)
if found is None:
    print("configs/pipelines/apriel_15b.py not found: clone the repository to see the full-size plan")
else:
    print(plan_text(load_config_file(str(found))))"""),
        md("""\
## Running the demo pipeline, stage by stage

Each stage writes `RUN_DIR/STAGE/run` (checkpoints, `metrics.jsonl`), `RUN_DIR/STAGE/final` (its
model, the next stage's starting point) and `RUN_DIR/STAGE/DONE.json` (its summary).
`runner.run(only=name)` skips a finished stage and resumes an interrupted one from its last checkpoint,
so rerunning a cell is safe (`Runner(cfg).run_stage(name)` always runs it)."""),
        code("""\
import json

from apriel_jax.stages.runner import Runner

runner = Runner(cfg)
summaries = {}


def run_stage(name):
    summary = runner.run(only=name)[0]
    summaries[name] = summary
    if summary["kind"] == "train":
        line = (f"{name}: {summary['steps']} steps, {summary['trainable_params']:,} trained / "
                f"{summary['frozen_params']:,} frozen parameters; train loss {summary['loss_start']:.3f} -> "
                f"{summary['loss_end']:.3f}")
        if summary.get("eval_loss_end") is not None:
            line += f"; held-out {summary['eval_loss_start']:.3f} -> {summary['eval_loss_end']:.3f}"
        if summary.get("averaged_steps") and len(summary["averaged_steps"]) > 1:
            line += f"; final = average of steps {summary['averaged_steps']}"
        print(line)
    return summary""")]
    for stage_name in ["base", "upscale", "realign", "cpt1", "cpt2", "sft_main", "sft_subset", "sft_long",
                       "merge"]:
        cells.append(md(STAGE_NOTES[stage_name]))
        extra = ""
        if stage_name == "upscale":
            extra = """
from apriel_jax.checkpoint.orbax_io import load_config

print("decoder layers:", load_config(runner_paths("base")).decoder.num_layers, "->",
      load_config(runner_paths("upscale")).decoder.num_layers)"""
        elif stage_name == "cpt2":
            extra = """
for task, t in summaries["cpt2"]["tasks"].items():
    print(f"held-out {task} accuracy {t['accuracy_start']:.2f} -> {t['accuracy_end']:.2f} (majority answer "
          f"{t['majority_baseline']:.2f}; blind, blank images: {t['blind_accuracy']:.2f})")"""
        elif stage_name == "merge":
            extra = """
print("merged", summaries["merge"]["merged"], "with weights", summaries["merge"]["weights"])"""
        body = f'run_stage("{stage_name}");' + extra
        if stage_name == "base":
            body = """\
from apriel_jax.stages.runner import stage_paths


def runner_paths(name):
    return stage_paths(cfg, name).final


""" + body
        cells.append(code(body))
    cells += [
        md("""\
## Loss curves and summary

`plot_pipeline` draws every stage's train and held-out loss on one step axis (stages side by side), with
the held-out task accuracies of the stages that measure them below. The summary table is what
`apriel-jax pipeline` prints at the end."""),
        code("""\
from IPython.display import Image as ShowImage, display

from apriel_jax.stages.report import plot_pipeline, summary_table, write_summary

png = plot_pipeline(cfg, Path(cfg.run_dir) / "curves.png")
display(ShowImage(filename=str(png)))
ordered = [summaries[name] for name in cfg.order]
write_summary(cfg, ordered)
print(summary_table(ordered))"""),
        md("""\
## Export and check

The last stage's final is exported as a Hugging Face `LlavaForConditionalGeneration` checkpoint (with
the tokenizer), then loaded with transformers (when installed) and compared with our logits."""),
        code("""\
from apriel_jax.cli_pipeline import check_export_with_transformers

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 matmuls on TPU/GPU for the comparison
hf_dir = runner.export()
print("Hugging Face export:", hf_dir, sorted(p.name for p in hf_dir.iterdir()))
print("transformers check:", check_export_with_transformers(hf_dir))"""),
        md("""\
Load the export like any checkpoint: `apriel_jax.from_pretrained(hf_dir)` (see `01_quickstart.ipynb`
to chat with it), or `LlavaForConditionalGeneration.from_pretrained(hf_dir)` in transformers."""),
    ]
    return cells
