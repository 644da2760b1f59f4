"""What a pipeline will do (``--plan``) and what it did (summary table, loss-curve PNG).

The stage logs are read from, and ``summary.json`` and the PNG written to, the run directory, local or
``gs://`` (``apriel_jax.storage``; ``summary.json`` atomically).
"""

from __future__ import annotations

import ml_collections

from apriel_jax import storage
from apriel_jax.model.lora import with_lora, without_lora
from apriel_jax.stages.config import averaged_steps, stage_steps, validate_pipeline
from apriel_jax.stages.runner import stage_paths


def _fmt_count(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _source_config(path: str):
    """The model config stored in a checkpoint directory, or None when it cannot be read yet."""
    from apriel_jax.checkpoint.pretrained import detect_format, read_hf_config

    try:
        fmt = detect_format(path)
    except (FileNotFoundError, ValueError):
        return None
    if fmt == "orbax":
        from apriel_jax.checkpoint.orbax_io import load_config

        return load_config(path)
    if fmt == "hf":
        return read_hf_config(path)
    from apriel_jax.checkpoint import mistral

    return mistral.from_params_json(mistral.read_params_json(path))


def stage_model_configs(cfg) -> dict[str, ml_collections.ConfigDict | None]:
    """The model config each stage trains (or produces, for merges), following inits and transforms."""
    out: dict[str, ml_collections.ConfigDict | None] = {}
    for i, name in enumerate(cfg.order):
        s = cfg.stages[name]
        if s.kind == "merge":
            out[name] = out.get(s.merge.stages[0]) if s.merge.stages else None
            continue
        if s.init == "random":
            model = ml_collections.ConfigDict(cfg.model.to_dict())
        elif s.init == "previous":
            model = out[cfg.order[i - 1]]
        elif s.init.startswith("stage:"):
            model = out[s.init[len("stage:"):]]
        elif s.init == "base":  # the declared model stands in until the checkpoint is readable
            model = _source_config(cfg.base) or ml_collections.ConfigDict(cfg.model.to_dict())
        else:
            model = _source_config(s.init)
        if model is not None and s.transform.kind == "upscale":
            model = ml_collections.ConfigDict(model.to_dict())
            model.decoder.num_layers = len(s.transform.layer_map) or int(s.transform.num_layers)
        if model is not None:  # a LoRA stage trains adapters on its init, which it loads merged
            model = with_lora(without_lora(model), s.train.lora) if s.train.lora.rank else without_lora(model)
        out[name] = model
    return out


def plan_text(cfg) -> str:
    """The plan: one row per stage (inits, frozen groups with parameter counts, data, budget) + totals."""
    from apriel_jax.train.loop import run_trainable
    from apriel_jax.train.optimizer import trainable_param_counts

    validate_pipeline(cfg)
    models = stage_model_configs(cfg)
    rows, total_tokens = [], 0
    for name in cfg.order:
        s = cfg.stages[name]
        model = models[name]
        if s.kind == "merge":
            weights = " + ".join(f"{w:g}×{st}" for st, w in zip(s.merge.stages, s.merge.weights))
            rows.append([name, weights, "merge", "-", "-", "-", _fmt_count(model and _total(model)), "-", "-",
                         "-", "-", "-", "-", "-"])
            continue
        t = s.train
        if model is not None:
            trainable, frozen = trainable_param_counts(model, run_trainable(t, model))
        else:
            trainable = frozen = None
        steps = stage_steps(s)
        tokens = steps * t.data.global_batch * t.data.seq_len
        total_tokens += tokens
        mixture = " ".join(f"{src['name']}:{src['weight']:g}" for src in t.data.sources)
        transform = "-" if s.transform.kind == "none" else (
            f"upscale→{len(s.transform.layer_map) or s.transform.num_layers}L")
        finalize = "last" if s.finalize.kind == "last" else (
            f"avg{s.finalize.num_checkpoints}@" + ",".join(str(k) for k in averaged_steps(s)))
        sched = f"{t.optimizer.schedule} {t.optimizer.peak_lr:g}"
        if t.optimizer.schedule == "cosine":
            sched += f" wu{t.optimizer.warmup_fraction:g}"
        rows.append([name, s.init if len(s.init) < 28 else "…" + s.init[-27:], transform,
                     ",".join(t.trainable), _fmt_count(trainable), _fmt_count(frozen),
                     _fmt_count(None if model is None else trainable + frozen), mixture,
                     str(t.data.seq_len) + (f"/sp{s.mesh.sequence}" if s.mesh.sequence > 1 else ""),
                     str(t.data.global_batch), str(steps), _fmt_count(tokens), sched, t.data.loss + "; " + finalize])
    header = ["stage", "init", "transform", "trainable", "train params", "frozen", "total", "data mixture",
              "seq", "batch", "steps", "tokens", "schedule", "loss; finalize"]
    mesh = " ".join(f"{k}={v}" for k, v in cfg.mesh.items())
    lines = [f"pipeline {cfg.name}: {len(cfg.order)} stages, {_fmt_count(total_tokens)} training tokens; "
             f"run_dir {cfg.run_dir}; mesh {mesh}", _table(header, rows)]
    return "\n".join(lines)


def _total(model) -> int:
    from apriel_jax.model import param_count

    return param_count(model)


def summary_table(summaries: list[dict]) -> str:
    """One row per stage; then, if any stage scored visual tasks, one row per (stage, task) with its held-out
    accuracy beside the majority-answer baseline and the blind control (the same questions, blank images)."""
    rows, task_rows = [], []
    for s in summaries:
        evals = "-" if s.get("eval_loss_end") is None else (
            f"{_fmt(s.get('eval_loss_start'))} → {_fmt(s['eval_loss_end'])}")
        loss = "-" if s.get("loss_end") is None else f"{_fmt(s.get('loss_start'))} → {_fmt(s['loss_end'])}"
        rows.append([s["stage"], _fmt_count(s.get("trainable_params")), _fmt_count(s.get("tokens")),
                     str(s.get("steps", 0)), loss, evals, f"{s.get('wall_s', 0):.0f}s"])
        for task, t in (s.get("tasks") or {}).items():
            task_rows.append([s["stage"], task, f"{_fmt(t['accuracy_start'], 2)} → {_fmt(t['accuracy_end'], 2)}",
                              _fmt(t["majority_baseline"], 2), _fmt(t["blind_accuracy"], 2)])
    table = _table(["stage", "trainable", "tokens", "steps", "train loss", "held-out loss", "wall"], rows)
    if task_rows:
        table += "\n\n" + _table(["stage", "task", "held-out accuracy", "majority answer", "blind (blank images)"],
                                  task_rows)
    return table


def plot_pipeline(cfg, out) -> storage.Location | None:
    """Train and held-out loss of every stage on one step axis (stages side by side), one PNG."""
    from apriel_jax.train.metrics import JSONL_NAME, read_jsonl
    from apriel_jax.train.plot import save_figure

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_task) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(3, 1))
    offset, drew = 0, False
    for name in cfg.order:
        path = stage_paths(cfg, name).run / JSONL_NAME
        with storage.storage_errors(path, "read"):
            found = path.is_file()
        if not found:
            continue
        entries = read_jsonl(path)
        train = [(e["step"], e["loss"]) for e in entries if e["split"] == "train" and e.get("loss") is not None]
        evals = [(e["step"], e["loss"]) for e in entries if e["split"] == "eval" and e.get("loss") is not None]
        scored = sorted({k for e in entries if e["split"] == "eval" for k in e
                         if k.endswith("_accuracy") and not k.endswith("_blind_accuracy")})
        tasks = {k.removesuffix("_accuracy"): [(e["step"], e[k]) for e in entries
                                               if e["split"] == "eval" and e.get(k) is not None] for k in scored}
        if not train:
            continue
        line = ax_loss.plot([offset + s for s, _ in train], [v for _, v in train], label=f"{name} train")[0]
        if evals:
            ax_loss.plot([offset + s for s, _ in evals], [v for _, v in evals], "o--", color=line.get_color(),
                         markersize=4, label=f"{name} held-out")
        for (task, points), marker in zip(tasks.items(), "so^vD"):
            ax_task.plot([offset + s for s, _ in points], [v for _, v in points], marker + "-",
                         color=line.get_color(), label=f"{name} {task} accuracy")
        ax_loss.axvline(offset, color="grey", alpha=0.3)
        ax_loss.text(offset, 1.0, f" {name}", transform=ax_loss.get_xaxis_transform(), va="top", fontsize=8)
        offset += max(s for s, _ in train)
        drew = True
    if not drew:
        plt.close(fig)
        return None
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"pipeline {cfg.name}")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=7, ncol=3)
    ax_task.set_ylabel("accuracy")
    ax_task.set_xlabel("step (stages concatenated)")
    ax_task.grid(alpha=0.3)
    if ax_task.get_legend_handles_labels()[0]:
        ax_task.legend(fontsize=7)
    return save_figure(fig, out)


def write_summary(cfg, summaries: list[dict]) -> storage.Location:
    path = storage.location(cfg.run_dir) / "summary.json"
    storage.write_json(path, summaries)
    return path
