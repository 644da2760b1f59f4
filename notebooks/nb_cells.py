"""Cells and helpers shared by the notebooks: markdown/code cell makers, the install cell, the runtime cell and
the tiny-checkpoint builder (``build_notebooks.py`` assembles the notebooks from the ``nb_*`` modules)."""

from __future__ import annotations

import textwrap

from nbformat.v4 import new_code_cell, new_markdown_cell


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
