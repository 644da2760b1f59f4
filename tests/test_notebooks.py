"""The Colab notebooks (notebooks/*.ipynb) run top to bottom in a fresh kernel without errors.

Each notebook is executed with nbclient in a kernel started from this interpreter (checked), with
``APRIEL_NOTEBOOK_SMOKE=1`` (a few steps per stage), 2 fake CPU devices and a temporary working
directory; a few key outputs are checked. The committed .ipynb files must also be what
``notebooks/build_notebooks.py`` generates.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "apriel-jax-notebook-test"

# What each notebook must print (besides running without an error).
EXPECTED = {
    "01_quickstart.ipynb": ["runtime: CPU, 2 x", "built a tiny random checkpoint", "reasoning:", "answer:"],
    "02_finetune.ipynb": ["trainable ('decoder', 'embeddings'):", "completed at step 4",
                          "reloaded logits identical to the trained model's: True", "answer:"],
    "03_conversion.ipynb": ["tensors bit-identical", "config.json: identical", "tokenizer.json: identical",
                            re.compile(r"max relative error vs transformers: \d\.\d\de-\d\d|transformers parity: skipped")],
    "04_recipe.ipynb": ["pipeline demo: 9 stages", "pipeline apriel_15b: 8 stages", "held-out loss",
                        "held-out counting accuracy", "merged ['sft_subset', 'sft_long']",
                        re.compile(r"transformers check: (LlavaForConditionalGeneration loads it|skipped)")],
    "05_colab_lora.ipynb": ["base quantized to int8", "quantized base: int8", "completed at step 4",
                            "adapters exported: adapter_config.json", "logits identical to the trained model's: True",
                            "answer:"],
}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec that runs this interpreter, and the environment of the kernel process."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernelspec")
    install(kernel_name=KERNEL_NAME, prefix=str(prefix))  # argv: [sys.executable, -m, ipykernel_launcher, ...]
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).strip()
    env.update(
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2".strip(),  # not the suite's 8
        APRIEL_NOTEBOOK_SMOKE="1",
        JUPYTER_PATH=os.pathsep.join([str(prefix / "share" / "jupyter"), env.get("JUPYTER_PATH", "")]).rstrip(os.pathsep),
        HF_HUB_OFFLINE="1",  # a notebook must never need the network
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the figures
    return env


def _outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_top_to_bottom(name, kernel_env, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", kernel_env["JUPYTER_PATH"])  # where the client finds the kernelspec
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: outputs not cleared"
    probe = nbformat.v4.new_code_cell("import sys, os\nprint('KERNEL', sys.prefix, os.getcwd())")
    nb.cells.insert(0, probe)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.time()
    try:
        client.execute(env=kernel_env)
    finally:  # keep what ran, for a look after a failure
        nbformat.write(nb, tmp_path / name)
    wall = time.time() - t0
    kernel_line = _outputs(nb.cells[0]).split()
    assert kernel_line[:2] == ["KERNEL", sys.prefix], f"the kernel ran another interpreter: {kernel_line}"
    assert Path(kernel_line[2]).resolve() == tmp_path.resolve()
    text = "\n".join(_outputs(c) for c in nb.cells if c.cell_type == "code")
    for want in EXPECTED[name]:
        if isinstance(want, re.Pattern):
            assert want.search(text), f"{name}: nothing matches {want.pattern!r} in:\n{text[-3000:]}"
        else:
            assert want in text, f"{name}: {want!r} not printed; output:\n{text[-3000:]}"
    print(f"{name}: {wall:.0f} s")


def test_notebooks_are_generated_from_the_builder():
    """The committed .ipynb files are exactly what build_notebooks.py writes (outputs cleared)."""
    result = subprocess.run([sys.executable, str(NOTEBOOKS / "build_notebooks.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
