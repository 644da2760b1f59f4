"""Training curves of a run directory (its ``metrics.jsonl``) as one PNG; matplotlib, no display needed.

The run directory and the image may be local or ``gs://``: the figure is rendered in memory and written
through ``apriel_jax.storage`` (atomically: a reader never sees half an image).
"""

from __future__ import annotations

import io

from apriel_jax import storage
from apriel_jax.train.metrics import JSONL_NAME, read_jsonl

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"))


def plot_run(run_dir, out) -> storage.Location:
    import matplotlib

    matplotlib.use("Agg")  # headless: training machines have no display
    import matplotlib.pyplot as plt

    path = storage.location(run_dir) / JSONL_NAME
    with storage.storage_errors(path, "read"):
        found = path.is_file()
    if not found:
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run directory?")
    entries = read_jsonl(path)
    if not entries:
        raise FileNotFoundError(f"{path} holds no metrics yet")
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 3 * len(PANELS)), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        for split in ("train", "eval"):
            points = [(e["step"], e[key]) for e in entries if e["split"] == split and e.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if split == "eval" else None, markersize=3, label=split)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[-1].set_xlabel("step")
    return save_figure(fig, out)


def save_figure(fig, out) -> storage.Location:
    """Write ``fig`` at ``out`` (local, parent folders created, or ``gs://``) and release it; the format
    follows the file name's suffix, as matplotlib's own ``savefig(path)`` does (PNG without one)."""
    import matplotlib.pyplot as plt

    out = storage.location(out)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=out.suffix[1:].lower() or "png", dpi=100)
    finally:
        plt.close(fig)
    storage.write_bytes(out, buf.getvalue())
    return out
