"""Writes the Colab notebooks of this folder from the cell sources below (outputs cleared).

    python notebooks/build_notebooks.py          # rewrite notebooks/*.ipynb
    python notebooks/build_notebooks.py --check  # exit 1 if a notebook differs from what this file builds

The notebooks are generated so that they can be reviewed (and diffed) as Python. Edit the cells here,
rerun, commit both. ``tests/test_notebooks.py`` executes every notebook top to bottom with
``APRIEL_NOTEBOOK_SMOKE=1`` (a few steps per stage) and checks that the committed files are up to date.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


def header(title: str, body: str):
    return md(f"# {title}\n\n" + textwrap.dedent(body).strip())


# The first code cell of every notebook. It must run before apriel_jax is importable, so it uses the standard
# library only; tests/test_notebooks.py executes it against a checkout, the package index, a git URL and
# nothing at all (with pip and git replaced by recorders).
INSTALL_CELL = '''\
# Installs apriel-jax (with the jax plugin of the runtime's accelerator) when this kernel cannot import it
# yet, e.g. in a fresh Colab session. Where from, first match wins:
#   1. APRIEL_JAX_SOURCE (here or in the environment): a checkout directory, a git URL (cloned to ./apriel-jax
#      and installed from there, so the repository's configs/ come along) or a wheel file;
#   2. the checkout this notebook was opened from (a folder above the working directory with setup.py);
#   3. the package index.
APRIEL_JAX_SOURCE = ""  # @param {type:"string"}

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path


class InstallStopped(Exception):
    """Why the cell could not install apriel-jax; Jupyter shows this one line instead of a traceback."""

    def _render_traceback_(self):
        return [f"InstallStopped: {self}"]


def accelerator_extra():
    if shutil.which("nvidia-smi"):
        return "[cuda12]"
    if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0") or "COLAB_TPU_ADDR" in os.environ:
        return "[tpu]"
    return ""


def checkout_above(folder):
    for candidate in [folder, *folder.parents]:
        if (candidate / "setup.py").is_file() and (candidate / "apriel_jax").is_dir():
            return candidate
    return None


def pip_install(*requirement):
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirement]).returncode == 0


def install_apriel_jax():
    if importlib.util.find_spec("apriel_jax") is not None:
        return "already importable"
    source, extra = APRIEL_JAX_SOURCE or os.environ.get("APRIEL_JAX_SOURCE", ""), accelerator_extra()
    if source.startswith(("git+", "https://", "http://", "git@", "ssh://")):
        clone = Path("apriel-jax").resolve()
        url = source.removeprefix("git+")
        if not clone.is_dir() and subprocess.run(["git", "clone", "--depth", "1", url, str(clone)]).returncode:
            raise InstallStopped(f"git could not clone {url}: check APRIEL_JAX_SOURCE and the network, then rerun")
        source = str(clone)
    if source and not Path(source).exists():
        raise InstallStopped(f"APRIEL_JAX_SOURCE={source!r} is neither a git URL nor an existing checkout or wheel")
    checkout = (Path(source).resolve() if source and Path(source).is_dir() else
                None if source else checkout_above(Path.cwd().resolve()))
    if checkout is not None:
        if not pip_install("-e", f"{checkout}{extra}"):
            raise InstallStopped(f"pip could not install the checkout {checkout}: see pip's messages above")
        sys.path.insert(0, str(checkout))  # an editable install is seen by new kernels only; this one now too
        where = f"checkout {checkout}"
    elif source:
        if not pip_install(f"apriel-jax{extra} @ {Path(source).resolve().as_uri()}"):
            raise InstallStopped(f"pip could not install {source}: see pip's messages above")
        where = f"wheel {source}"
    elif pip_install(f"apriel-jax{extra}"):
        where = "the package index"
    else:
        raise InstallStopped("apriel-jax is not installed and the package index has no release of it: set "
                             "APRIEL_JAX_SOURCE at the top of this cell to the repository's git URL, a checkout "
                             "directory or a wheel file, then run the cell again")
    importlib.invalidate_caches()
    if importlib.util.find_spec("apriel_jax") is None:
        raise InstallStopped("apriel-jax was installed but this kernel cannot import it: restart the session "
                             "(Colab: Runtime > Restart session) and run the notebook again")
    return f"installed from {where}{extra}"


print("apriel-jax:", install_apriel_jax())
# If pip upgraded numpy or jax that this kernel had already imported: restart the session and run again.'''


RUNTIME_CELL = """\
import warnings

import jax

from apriel_jax.parallel.mesh import make_mesh

SMOKE = os.environ.get("APRIEL_NOTEBOOK_SMOKE") == "1"  # set by CI: a few steps instead of the real sizes

devices = jax.devices()
RUNTIME = {"tpu": "TPU", "gpu": "GPU"}.get(devices[0].platform, "CPU")
# FSDP over every device: each parameter is split across all of them (1 device: nothing is split).
mesh = make_mesh({"fsdp": -1})
print(f"runtime: {RUNTIME}, {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}")
print(f"mesh: {dict(mesh.shape)}" + ("  [smoke mode: tiny step counts]" if SMOKE else ""))
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a Jupyter without ipywidgets
"""

# Builds a random tiny HF checkpoint (the `tiny` preset + the demo tokenizer); shared by notebooks 1-3.
TINY_CHECKPOINT = '''\
from pathlib import Path

from flax import nnx

import apriel_jax
from apriel_jax.checkpoint.hf_export import export_hf
from apriel_jax.data.tokenizer import load_tokenizer
from apriel_jax.model import create_model, get_preset, param_count

DEMO_DATA = Path(apriel_jax.__file__).parent / "data" / "demo_data"  # ships with the package


def build_tiny_checkpoint(out_dir, seed=0):
    """A random model of the `tiny` preset (every architectural feature of Apriel, ~0.4M parameters),
    exported in Hugging Face format together with the demo tokenizer (vocab 1024, Pixtral's special ids)."""
    cfg = get_preset("tiny")
    tok = load_tokenizer(DEMO_DATA / "tokenizer.json")
    assert tok.vocab_size == cfg.decoder.vocab_size and tok.image_id == cfg.image_token_id
    model = create_model(cfg, seed=seed, mesh=mesh)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    # source_dir: tokenizer.json is copied next to the weights, as in a real HF checkpoint.
    return export_hf(nnx.state(model), cfg, out_dir, source_dir=DEMO_DATA, token_ids=ids, overwrite=True)


def describe(path):
    files = sorted(p for p in Path(path).iterdir() if p.is_file())
    return ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.2f} MB)" for p in files)
'''


# ------------------------------------------------------------------------------------------ 01 quickstart


def quickstart():
    return [
        header("apriel-jax quickstart: load a checkpoint and chat with an image", """\
This notebook runs on a Colab CPU, GPU or TPU runtime (or any Jupyter with `apriel-jax` installed):

1. installs `apriel-jax` when the kernel cannot import it yet (a fresh Colab session) and detects the runtime;
2. picks a device mesh: FSDP over every device;
3. loads a checkpoint with `apriel_jax.from_pretrained`: by default a **tiny random model** built on the
   fly, or a real Apriel-1.5 / Pixtral checkpoint in Hugging Face format;
4. chats with it about an image (`apriel_jax.chat.chat`) and prints the reasoning and the final answer
   separately."""),
        code(INSTALL_CELL),
        md("""\
## Runtime and mesh

`jax.devices()` tells which accelerator the runtime has. The mesh has the axes `data`, `fsdp`, `tensor`
and `sequence`; here every device goes on `fsdp`, so each parameter is split across all devices and a
model that does not fit on one chip still loads (on a TPU v2-8 runtime: 8 shards)."""),
        code(RUNTIME_CELL),
        md("""\
## The checkpoint

`CHECKPOINT` is a directory in Hugging Face format (`config.json` + `*.safetensors`, a
`LlavaForConditionalGeneration` with a Pixtral vision tower), a Mistral consolidated directory
(`params.json` + `consolidated.safetensors`) or an apriel-jax orbax checkpoint.

* **Empty (default):** a tiny random model (the `tiny` preset: 2-layer vision tower with 2-D RoPE, GELU
  projector, 2-layer GQA decoder) is created and exported to HF format with the demo tokenizer, in
  seconds on a CPU.
* **The real model:** download `ServiceNow-AI/Apriel-1.5-15b-Thinker` (or a Pixtral-12B in HF layout)
  and set `CHECKPOINT` to its directory, e.g.
  `from huggingface_hub import snapshot_download; CHECKPOINT = snapshot_download("ServiceNow-AI/Apriel-1.5-15b-Thinker")`.
  15B parameters in bfloat16 are about 30 GB: that needs an accelerator runtime with at least that much
  memory in total over its devices (the mesh shards the weights over all of them)."""),
        code(TINY_CHECKPOINT),
        code("""\
CHECKPOINT = ""  # @param {type:"string"}

TINY = not CHECKPOINT
if TINY:
    CHECKPOINT = str(build_tiny_checkpoint("runs/notebooks/tiny_hf"))
    print(f"built a tiny random checkpoint: {CHECKPOINT}")
print(describe(CHECKPOINT))"""),
        md("""\
## Load

`from_pretrained` reads every tensor straight into its shard on the mesh (memory-mapped safetensors).
`dtype="bfloat16"` would load a float32 checkpoint for bfloat16 compute; by default parameters keep
their stored dtype."""),
        code("""\
import time

t0 = time.time()
model = apriel_jax.from_pretrained(CHECKPOINT, mesh=mesh)
tokenizer = load_tokenizer(CHECKPOINT)  # the tokenizer.json of the checkpoint directory
cfg = model.config
print(f"loaded in {time.time() - t0:.1f} s: {param_count(cfg):,} parameters, "
      f"{cfg.vision.num_layers}-layer vision tower, {cfg.decoder.num_layers}-layer decoder, "
      f"vocab {cfg.decoder.vocab_size}, stored dtype {cfg.param_dtype}")"""),
        md("""\
## Chat with an image

`chat(model, tokenizer, messages)` renders the conversation in the Apriel chat format (system prompt,
`<|user|>`, the image as `[IMG]` patch tokens, `<|assistant|>`: Apriel-1.5's chat template),
generates with the KV cache until end-of-sequence, and splits the reply: `reasoning` (the thoughts
before `[BEGIN FINAL RESPONSE]`), `answer` and `tool_calls`.

**The tiny model is random:** it prints gibberish (and, as it never writes `[BEGIN FINAL RESPONSE]`,
everything it writes lands in `answer` and `reasoning` is `None`). With the real Apriel checkpoint the
same cell prints its reasoning, then the answer. Notebook 02 fine-tunes a model until it writes the
format."""),
        code("""\
from IPython.display import display
from PIL import Image

from apriel_jax.chat import chat
from apriel_jax.model.generate import SamplingConfig

image = Image.open(DEMO_DATA / "images" / "house.png").convert("RGB")  # or any PIL image / path / bytes
display(image)
messages = [{"role": "user", "content": [
    {"type": "image", "image": image},
    {"type": "text", "text": "What is in this picture? Answer in one sentence."},
]}]
MAX_NEW_TOKENS = 16 if SMOKE else 64 if TINY else 2048  # Apriel reasons at length before answering
# Greedy; for the real model Apriel's usual sampling is SamplingConfig(temperature=0.6, top_p=0.95, ...).
sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)

t0 = time.time()
reply = chat(model, tokenizer, messages, sampling=sampling)
print(f"({len(reply.tokens)} new tokens in {time.time() - t0:.1f} s, compilation included)\\n")
print("reasoning:", reply.reasoning)
print("answer:", reply.answer)
if reply.tool_calls:
    print("tool calls:", reply.tool_calls)"""),
        md("""\
To continue the conversation, append the reply and the next question:
`messages += [{"role": "assistant", "reasoning": reply.reasoning, "content": reply.answer},
{"role": "user", "content": "..."}]`. `mode="think"` / `mode="nothink"` use the `<think>` and
`<nothink>` tags instead of the Apriel format, and `tools=[...]` adds function signatures to the
system prompt (the calls come back in `reply.tool_calls`).

Next: `02_finetune.ipynb` (SFT with frozen groups), `03_conversion.ipynb` (HF ↔ orbax with a parity
check), `04_recipe.ipynb` (the whole Apriel training recipe on a tiny model)."""),
    ]


# ------------------------------------------------------------------------------------------ 02 finetune


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


# ------------------------------------------------------------------------------------------ 03 conversion


def conversion():
    return [
        header("Checkpoint conversion: Hugging Face → orbax → Hugging Face, with a parity check", """\
apriel-jax reads and writes three formats: Hugging Face (`LlavaForConditionalGeneration` with a Pixtral
vision tower), Mistral consolidated, and its own orbax checkpoints (sharded, restorable onto any mesh).
This notebook

1. builds a tiny HF checkpoint (or takes yours: `HF_CHECKPOINT`);
2. converts it to orbax (`hf_to_orbax`) and back (`orbax_to_hf`);
3. checks that every tensor comes back **byte for byte**, with the config and tokenizer files;
4. compares our logits with those of transformers' `LlavaForConditionalGeneration` on a prompt with an
   image (when torch and transformers are installed; skipped otherwise).

The same conversions exist on the command line:
`apriel-jax convert hf-to-orbax SRC DST` and `apriel-jax convert orbax-to-hf SRC DST [--dtype bfloat16]`."""),
        code(INSTALL_CELL),
        code(RUNTIME_CELL + """\
# Full-precision fp32 matmuls: TPUs and GPUs otherwise round them (bf16 passes / TF32), which the parity
# check below would measure instead of the conversion.
jax.config.update("jax_default_matmul_precision", "highest")"""),
        code(TINY_CHECKPOINT),
        code("""\
HF_CHECKPOINT = ""  # @param {type:"string"}
WORK = Path("runs/notebooks/conversion")

if not HF_CHECKPOINT:
    HF_CHECKPOINT = str(build_tiny_checkpoint(WORK / "hf"))
print(HF_CHECKPOINT, "->", describe(HF_CHECKPOINT))"""),
        md("""\
## HF → orbax → HF

Conversion streams one tensor at a time (host memory stays near the largest tensor beyond the model);
outputs are written under a temporary name and renamed into place. The orbax directory keeps the source's
`config.json` (as `hf_config.json`) and its tokenizer files, so token ids and tokenizer survive the round
trip."""),
        code("""\
import time

from apriel_jax.checkpoint.pretrained import hf_to_orbax, orbax_to_hf

ORBAX_DIR, HF_BACK = WORK / "orbax", WORK / "hf_roundtrip"
t0 = time.time()
hf_to_orbax(HF_CHECKPOINT, ORBAX_DIR, overwrite=True)
print(f"hf_to_orbax  {time.time() - t0:5.1f} s -> {ORBAX_DIR}: {sorted(p.name for p in ORBAX_DIR.iterdir())}")
t0 = time.time()
orbax_to_hf(ORBAX_DIR, HF_BACK, overwrite=True)
print(f"orbax_to_hf  {time.time() - t0:5.1f} s -> {HF_BACK}: {describe(HF_BACK)}")"""),
        md("""\
## Byte-for-byte comparison

Every tensor of the original and of the round trip: same names, dtypes, shapes and bytes."""),
        code("""\
from safetensors import safe_open


def read_tensors(path):
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


a, b = read_tensors(HF_CHECKPOINT), read_tensors(HF_BACK)
assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
assert not differ, f"tensors changed in the round trip: {differ[:5]}"
print(f"{len(a)} tensors bit-identical ({sum(x.nbytes for x in a.values()) / 1e6:.2f} MB, "
      f"dtypes {sorted({str(x.dtype) for x in a.values()})})")
for fname in ("config.json", "tokenizer.json"):
    if (Path(HF_CHECKPOINT) / fname).is_file():
        same = (Path(HF_CHECKPOINT) / fname).read_bytes() == (HF_BACK / fname).read_bytes()
        print(f"{fname}: {'identical' if same else 'DIFFERENT'}")
        assert same
print("examples:", ", ".join(f"{k} {list(a[k].shape)}" for k in sorted(a)[:3]))"""),
        md("""\
## bfloat16

Exporting with `dtype="bfloat16"` halves the size; a bfloat16 checkpoint also converts losslessly
(`hf_to_orbax` keeps the stored dtype unless `param_dtype` says otherwise)."""),
        code("""\
orbax_to_hf(ORBAX_DIR, WORK / "hf_bf16", dtype="bfloat16", overwrite=True)
hf_to_orbax(WORK / "hf_bf16", WORK / "orbax_bf16", overwrite=True)
orbax_to_hf(WORK / "orbax_bf16", WORK / "hf_bf16_roundtrip", overwrite=True)
c, d = read_tensors(WORK / "hf_bf16"), read_tensors(WORK / "hf_bf16_roundtrip")
assert c.keys() == d.keys() and all(c[k].tobytes() == d[k].tobytes() and c[k].dtype == d[k].dtype for k in c)
print(f"bfloat16: {len(c)} tensors bit-identical after HF -> orbax -> HF "
      f"({sum(x.nbytes for x in c.values()) / 1e6:.2f} MB vs {sum(x.nbytes for x in a.values()) / 1e6:.2f} MB fp32)")"""),
        md("""\
## Logits parity with transformers

One prompt with an image, built the way a transformers Pixtral processor returns it (`input_ids` with
the image's `[IMG]` / `[IMG_BREAK]` / `[IMG_END]` tokens, `pixel_values` as `[images, 3, H, W]`,
`image_sizes`); `from_hf_inputs` turns those arrays into our batch. Our model is loaded from the
round-tripped checkpoint, transformers' from the same directory. Reported: the maximum relative logits
error, `max |ours - transformers| / max |transformers|` (the test suite's limit is 1e-5 in fp32).
This compares full fp32 forward passes on the host, so it is skipped for checkpoints above 2B
parameters."""),
        code("""\
import numpy as np
from PIL import Image

from apriel_jax.data import from_hf_inputs
from apriel_jax.data.images import ImageConfig, preprocess_image
from apriel_jax.data.prompt import encode_prompt

ours_model = apriel_jax.from_pretrained(HF_BACK, dtype="float32", param_dtype="float32", mesh=mesh)
mcfg = ours_model.config
tokenizer = load_tokenizer(HF_BACK)
image_cfg = ImageConfig(longest_edge=min(256, mcfg.vision.image_size), patch_size=mcfg.vision.patch_size)
image = Image.open(DEMO_DATA / "images" / "bar_chart.png").convert("RGB")
input_ids, _ = encode_prompt([image, "Which bar is the tallest?"], tokenizer, image_cfg)
pixels = preprocess_image(image, image_cfg)  # [H, W, 3] float32, normalised (Pixtral's preprocessing)
hf_inputs = {
    "input_ids": np.asarray([input_ids], np.int64),
    "attention_mask": np.ones((1, len(input_ids)), np.int64),
    "pixel_values": pixels.transpose(2, 0, 1)[None].astype(np.float32),
    "image_sizes": np.asarray([pixels.shape[:2]], np.int64),
}
batch = from_hf_inputs(hf_inputs["input_ids"], hf_inputs["pixel_values"], hf_inputs["image_sizes"],
                       hf_inputs["attention_mask"], image_token_id=mcfg.image_token_id,
                       patch_size=mcfg.vision.patch_size, pad_id=tokenizer.pad_id)
ours = np.asarray(ours_model(batch))
print(f"prompt: {len(input_ids)} tokens, image {pixels.shape[1]}x{pixels.shape[0]} px -> "
      f"{batch['patches'].shape[1]} patches; our logits {list(ours.shape)}")"""),
        code("""\
try:
    import torch
    from transformers import LlavaForConditionalGeneration
except ImportError as e:
    torch = None
    print(f"transformers parity: skipped ({e.name or 'torch/transformers'} is not installed; "
          "pip install torch transformers to run it)")

if torch is not None and param_count(mcfg) > 2e9:
    print("transformers parity: skipped (a checkpoint this size needs more host memory than a notebook has)")
elif torch is not None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ref_model = LlavaForConditionalGeneration.from_pretrained(str(HF_BACK), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(**{k: torch.as_tensor(v) for k, v in hf_inputs.items()}, use_cache=False).logits.numpy()
    rel = float(np.abs(ref - ours).max() / np.abs(ref).max())
    agree = float((ref.argmax(-1) == ours.argmax(-1)).mean())
    print(f"transformers {type(ref_model).__name__}: logits {list(ref.shape)}")
    print(f"max relative error vs transformers: {rel:.2e} (argmax agreement {agree:.0%})")
    assert rel < 1e-4, rel"""),
    ]


# ------------------------------------------------------------------------------------------ 04 recipe


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


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_finetune.ipynb": finetune,
    "03_conversion.ipynb": conversion,
    "04_recipe.ipynb": recipe,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata.update({
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "toc_visible": True},
    })
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives identical files
        cell["id"] = f"{Path(name).stem[:2]}-{i:02d}"
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the notebooks are up to date")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / name
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/build_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
