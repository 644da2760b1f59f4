"""Training curves of a run directory (its ``metrics.jsonl``) as one PNG; matplotlib, no display needed."""

from __future__ import annotations

from pathlib import Path

from apriel_jax.train.metrics import JSONL_NAME, read_jsonl

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"))


def plot_run(run_dir, out) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: training machines have no display
    import matplotlib.pyplot as plt

    path = Path(run_dir) / JSONL_NAME
    if not path.is_file():
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


def save_figure(fig, out) -> Path:
    """Write ``fig`` as a PNG at ``out`` (parent folders created) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
