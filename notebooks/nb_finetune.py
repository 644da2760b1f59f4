"""02_finetune.ipynb: SFT with frozen groups, a live loss curve and an HF export."""

from __future__ import annotations

from nb_cells import INSTALL_CELL, RUNTIME_CELL, TINY_CHECKPOINT, code, header, md


def finetune():
    return [
        header("Fine-tune (SFT) with frozen groups, a live loss curve and an HF export", """\
Supervised fine-tuning of a model on reasoning chats, as in the SFT stage of the Apriel-1.5 recipe:

* data: the 20 chats shipped with the package (`chat_sft.jsonl`: math word problems with worked
  reasoning, multi-turn chats, tool use) mixed with generated reasoning chats (`kind="synthetic_chat"`),
  rendered in the Apriel chat format with the loss on the assistant responses only;
* frozen groups: only `decoder` and `embeddings` are trained; the vision tower and the projector get no
  gradient and no optimizer state;
* a loss curve redrawn while training runs, from the run's `metrics.jsonl`;
* the result exported to Hugging Face format and loaded back.

By default the base model is a tiny random model (CPU-friendly: a few minutes on a Colab CPU); point
`BASE_CHECKPOINT` at a real HF checkpoint and raise `SEQ_LEN` for a real run (on an accelerator)."""),
        code(INSTALL_CELL),
        code(RUNTIME_CELL),
        code(TINY_CHECKPOINT),
        code("""\
BASE_CHECKPOINT = ""  # @param {type:"string"}
RUN_DIR = Path("runs/notebooks/finetune")

if not BASE_CHECKPOINT:
    BASE_CHECKPOINT = str(build_tiny_checkpoint("runs/notebooks/finetune_base"))
print(BASE_CHECKPOINT, "->", describe(BASE_CHECKPOINT))"""),
        md("""\
## Trainable and frozen parameters

`trainable` takes the groups of `apriel_jax.train.optimizer.GROUPS` (`vision`, `projector`, `decoder`,
`embeddings`) or globs over parameter paths. The counts come from abstract shapes (nothing is
allocated)."""),
        code("""\
from apriel_jax.checkpoint.pretrained import read_hf_config
from apriel_jax.train.optimizer import GROUPS, trainable_param_counts

TRAINABLE = ("decoder", "embeddings")
base_cfg = read_hf_config(BASE_CHECKPOINT)
for group in [g for g in GROUPS if g not in ("all", "lora")]:  # lora: adapters, which a base model has none of
    print(f"  {group:<11} {trainable_param_counts(base_cfg, (group,))[0]:>12,} parameters")
trainable, frozen = trainable_param_counts(base_cfg, TRAINABLE)
print(f"trainable {TRAINABLE}: {trainable:,}; frozen: {frozen:,} "
      f"({100 * trainable / (trainable + frozen):.1f}% trained)")"""),
        md("""\
## The run config

`train_config()` is the typed config of `apriel-jax train` (the same fields as a stage's `train` in a
pipeline). The data mixture is weighted by tokens; the held-out evaluation draws generated chats from
another seed than training (a real held-out split)."""),
        code("""\
from apriel_jax.train.config import source, train_config

STEPS = 4 if SMOKE else 240  # ~1 min on a 2-core CPU
SEQ_LEN = 256

cfg = train_config()
cfg.run_dir = str(RUN_DIR)
cfg.init.from_pretrained = BASE_CHECKPOINT  # its model config replaces cfg.model
cfg.init.param_dtype = "float32"  # fp32 master weights
cfg.trainable = TRAINABLE
cfg.data.update(
    sources=[source("chats", "jsonl", [str(DEMO_DATA / "chat_sft.jsonl")], weight=0.3),
             source("reasoning_chats", "synthetic_chat", weight=0.7)],
    tokenizer=BASE_CHECKPOINT,  # the checkpoint directory's tokenizer.json
    chat_format="apriel", loss="responses", seq_len=SEQ_LEN, global_batch=8,
)
cfg.optimizer.update(peak_lr=3e-3, schedule="cosine", warmup_fraction=0.1, weight_decay=0.01)
cfg.steps = STEPS
cfg.checkpoint.update(save_every=max(STEPS // 2, 1), keep_last=2)
cfg.eval.update(every=max(STEPS // 4, 2), batches=1 if SMOKE else 2, at_start=True,
                sources=[source("reasoning_chats", "synthetic_chat", weight=1.0)])
cfg.log.update(console=False, tensorboard=False)  # the plot below is the progress display
print(f"{STEPS} steps x {cfg.data.global_batch} rows x {SEQ_LEN} tokens")"""),
        md("""\
## Train with a live loss curve

`train(cfg)` runs in a background thread; this cell redraws the train and held-out loss from
`RUN_DIR/metrics.jsonl` every few seconds until it finishes. The run checkpoints every `save_every`
steps: rerunning the cell after an interruption (or with a larger `cfg.steps`) resumes from the latest
checkpoint, data iterator included. The first step includes the compilation."""),
        code("""\
import threading
import time

import matplotlib.pyplot as plt
from IPython.display import display

from apriel_jax.train.loop import train
from apriel_jax.train.metrics import JSONL_NAME, read_jsonl


def plot_metrics(run_dir, ax):
    path = Path(run_dir) / JSONL_NAME
    entries = read_jsonl(path) if path.is_file() else []
    ax.clear()
    for split, style in (("train", "-"), ("eval", "o--")):
        points = [(e["step"], e["loss"]) for e in entries if e["split"] == split and e.get("loss") is not None]
        if points:
            ax.plot(*zip(*points), style, label="held-out" if split == "eval" else split)
    ax.set(xlabel="step", ylabel="loss (responses only)", title="SFT: decoder + embeddings")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return entries


result, errors = {}, []  # the run's summary; an exception of the thread (re-raised below)


def run():
    try:
        result.update(train(cfg))
    except BaseException as e:  # noqa: BLE001
        errors.append(e)


worker = threading.Thread(target=run, daemon=True)
fig, ax = plt.subplots(figsize=(7, 3.5))
handle = display(fig, display_id=True)
t0 = time.time()
worker.start()
while worker.is_alive():
    worker.join(timeout=3.0)
    plot_metrics(RUN_DIR, ax)
    handle.update(fig)
entries = plot_metrics(RUN_DIR, ax)
handle.update(fig)
plt.close(fig)
if errors:
    raise errors[0]
print(f"{result['status']} at step {result['step']} in {time.time() - t0:.0f} s: "
      f"train loss {result['loss']:.3f}, held-out loss {result['eval_loss']:.3f}")"""),
        md("""\
## Export to Hugging Face format and reload

The run's latest checkpoint holds the trained (`params`) and frozen halves of the model and the
optimizer state. `setup(cfg)` restores it onto the mesh; `export_hf` writes the model as a
`LlavaForConditionalGeneration` checkpoint, carrying the tokenizer and token ids over from the base
checkpoint. The reloaded model must give exactly the logits of the trained one."""),
        code("""\
import numpy as np

from apriel_jax.checkpoint.hf_export import export_hf
from apriel_jax.train.loop import setup

run = setup(cfg)  # restores the latest checkpoint of RUN_DIR
run.ckpt.close()
trained = nnx.merge(run.graphdef, run.state.params, run.state.frozen)
HF_OUT = RUN_DIR / "hf"
export_hf(nnx.state(trained), run.model_cfg, HF_OUT, source_dir=BASE_CHECKPOINT, overwrite=True)
print(f"step {int(run.state.step)} exported to {HF_OUT}: {describe(HF_OUT)}")

reloaded = apriel_jax.from_pretrained(HF_OUT, mesh=mesh)
base = apriel_jax.from_pretrained(BASE_CHECKPOINT, mesh=mesh)
batch = {"tokens": np.arange(20, 52, dtype=np.int32)[None], "positions": np.arange(32, dtype=np.int32)[None],
         "segment_ids": np.ones((1, 32), np.int32)}
same = np.array_equal(np.asarray(trained(batch)), np.asarray(reloaded(batch)))
print("reloaded logits identical to the trained model's:", same)
assert same


from apriel_jax.model.factory import param_path
from apriel_jax.train.optimizer import matches


def flat_params(m):
    return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param))}


before, after = flat_params(base), flat_params(reloaded)
for group in ("vision", "projector", "decoder", "embeddings"):
    names = [n for n in before if matches(n, GROUPS[group])]
    changed = sum(not np.array_equal(before[n], after[n]) for n in names)
    print(f"  {group:<10} {changed}/{len(names)} tensors changed by SFT")
    assert (changed > 0) == (group in TRAINABLE), group"""),
        md("""\
## Chat with the fine-tuned model

After the default 240 steps the tiny model has learned the *format* of the SFT data (reasoning, then
`[BEGIN FINAL RESPONSE]`, the answer, `[END FINAL RESPONSE]`), so `chat` splits its reply into reasoning
and answer; the arithmetic is still wrong at this size. (In CI's smoke mode, 4 steps, it has not learned
the format yet.)"""),
        code("""\
from apriel_jax.chat import chat
from apriel_jax.model.generate import SamplingConfig

question = [{"role": "user", "content": "A shop sells 4 apples for $2. How much do 10 apples cost?"}]
reply = chat(reloaded, load_tokenizer(HF_OUT), question,
             sampling=SamplingConfig(max_new_tokens=16 if SMOKE else 128))
print("reasoning:", reply.reasoning)
print("answer:", reply.answer)"""),
    ]
