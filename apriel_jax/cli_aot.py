"""``apriel-jax aot``: compile the real training step for a TPU topology on any host and report the fit.

Nothing runs and no TPU is needed: libtpu describes the topology (``jax.experimental.topologies``), the
train state and batch are abstract arrays sharded over that topology's mesh, and XLA compiles the step
exactly as it would on the pod. The report gives per-chip HBM use (arguments: parameters, optimizer
state and batch shards; temporaries: activations and scratch; peak) against the chip's capacity, the
compile time, and XLA's FLOP count against the analytic model FLOPs; then each step's communication:
the bytes per chip of every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute,
with loop trip counts multiplied in (``apriel_jax.parallel.collectives``).

CONFIG is a pipeline config (every training stage, or ``--stage``) or a train config. With ``--generate N``
the program compiled is KV-cached generation of N new tokens instead (one prompt of the config's
``data.seq_len`` tokens and ``data.patch_budget`` image patches, the model's parameters as the config stores
them, e.g. with an int8 base), the inference a Colab user runs.
"""

from __future__ import annotations

import math

HEADROOM = 0.85  # a configuration "fits" when its peak stays under this share of HBM

_EPILOG = """\
examples:
  apriel-jax aot configs/pipelines/apriel_15b.py --stage cpt1 --topology v5p:4x4x4
  apriel-jax aot configs/pipelines/apriel_15b.py --stage sft_long --topology v5p:2x4x4
  apriel-jax aot configs/pipelines/apriel_15b.py --stage cpt2 --topology v5e:16x16 --config.stages.cpt2.train.data.global_batch=256
  apriel-jax aot configs/train/tiny_text.py --topology v5e:2x2
  apriel-jax aot configs/train/colab_lora_15b.py:v6e-int8 --generate 4096

exit codes: 0 every compiled configuration fits (peak <= 85% of HBM); 1 one does not fit or failed to
compile; 2 bad config or command line.
"""


def add_parser(commands, debug, fmt) -> None:
    p = commands.add_parser(
        "aot", parents=[debug], formatter_class=fmt, epilog=_EPILOG,
        help="compile the training step for a TPU topology (no TPU needed) and report HBM use",
        description=__doc__.split("\n\n")[0])
    p.add_argument("config", metavar="CONFIG", help="pipeline or train config file (PATH or PATH:ARG)")
    p.add_argument("--topology", help="TPU topology, e.g. v5p:4x4x4 (64 chips), v5e:16x16, v6e:8x8 "
                                      "(default: the config's target.topology)")
    p.add_argument("--stage", action="append", metavar="STAGE",
                   help="pipeline stage to compile (repeatable; default: every training stage)")
    p.add_argument("--num-slices", type=int, default=0,
                   help="slices of the topology (default: the product of the config's mesh_dcn degrees)")
    p.add_argument("--generate", type=int, default=0, metavar="NEW_TOKENS",
                   help="compile KV-cached generation of NEW_TOKENS tokens after one prompt of data.seq_len "
                        "tokens (data.patch_budget patches) instead of the training step")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON (local or gs://)")
    p.add_argument("--hlo", metavar="DIR", help="also write each stage's optimized HLO module to DIR/STAGE.hlo.txt "
                                                "(local or gs://)")
    p.set_defaults(handler=_run)


def stage_cases(cfg, stages: list[str] | None) -> list[tuple[str, object, object]]:
    """(name, model config, train config) for each training stage of a pipeline, or the train config."""
    import ml_collections

    if "order" not in cfg:  # a train config: its model as the run builds it (quantized base, LoRA adapters)
        from apriel_jax.train.loop import run_model_config

        return [("train", run_model_config(cfg), cfg)]
    from apriel_jax.stages.report import stage_model_configs
    from apriel_jax.stages.runner import stage_train_config

    models = stage_model_configs(cfg)
    names = [n for n in cfg.order if cfg.stages[n].kind == "train"]
    for s in stages or []:
        if s not in names:
            raise ValueError(f"--stage {s!r} is not a training stage of this pipeline; training stages: {names}")
    cases = []
    for name in stages or names:
        model = ml_collections.ConfigDict(models[name].to_dict())
        # The pipeline's numerics and memory policy apply whatever checkpoint a stage starts from.
        for key in ("dtype", "param_dtype", "remat_policy", "attention_impl"):
            model[key] = cfg.model[key]
        cases.append((name, model, stage_train_config(cfg, name, None)))
    return cases


def compile_case(model_cfg, tcfg, topology: str, num_slices: int, hlo_path: str | None = None,
                 generate: int = 0) -> dict:
    """One stage's row of the report (its training step, or generating ``generate`` tokens); with ``hlo_path``
    the optimized HLO module is written there."""
    if generate:
        return _generate_case(model_cfg, tcfg, topology, generate, hlo_path)
    from apriel_jax.train.aot import compile_train_step
    from apriel_jax.train.loop import optimizer_from_config, run_trainable

    degrees = {k: int(v) for k, v in tcfg.mesh.items()}
    dcn = {k: int(v) for k, v in tcfg.mesh_dcn.items()}
    slices = num_slices or max(1, math.prod(dcn.values()))
    report, model_flops = compile_train_step(
        model_cfg, optimizer_from_config(tcfg), topology, degrees, batch=tcfg.data.global_batch, seq=tcfg.data.seq_len,
        patches=tcfg.data.patch_budget,
        trainable=run_trainable(tcfg, model_cfg),
        grad_accum_steps=tcfg.grad_accum_steps, chunk_size=tcfg.chunk_size,
        lm_head_grad_dtype=tcfg.lm_head_grad_dtype or None, num_slices=slices, dcn_degrees=dcn if slices > 1 else None)
    return _row(report, model_cfg, topology, slices=slices, batch=tcfg.data.global_batch, seq=tcfg.data.seq_len,
                patches=tcfg.data.patch_budget, remat=model_cfg.remat_policy, model_flops=model_flops,
                hlo_path=hlo_path)


def _generate_case(model_cfg, tcfg, topology: str, new_tokens: int, hlo_path: str | None) -> dict:
    from apriel_jax.model.generate_aot import compile_generate
    from apriel_jax.train.flops import generate_flops

    degrees = {k: int(v) for k, v in tcfg.mesh.items()}
    seq, patches = tcfg.data.seq_len, tcfg.data.patch_budget
    report = compile_generate(model_cfg, topology, degrees, batch=1, prompt_len=seq, new_tokens=new_tokens,
                              patches=patches)
    flops = generate_flops(model_cfg, batch=1, prompt_len=seq, new_tokens=new_tokens,
                           image_patch_counts=[256] * (patches // 256))
    row = _row(report, model_cfg, topology, slices=1, batch=1, seq=seq, patches=patches, remat="-",
               model_flops=flops, hlo_path=hlo_path)
    return dict(row, new_tokens=new_tokens)


def _row(report, model_cfg, topology: str, *, slices: int, batch: int, seq: int, patches: int, remat: str,
         model_flops: float, hlo_path: str | None) -> dict:
    from apriel_jax.parallel.aot import hbm_per_chip

    hbm = hbm_per_chip(topology)
    row = dict(topology=topology, slices=slices, chips=report.chips, mesh=report.mesh_shape,
               batch=batch, seq=seq, patches=patches, remat=remat, attention=model_cfg.attention_impl,
               argument_gb=report.argument_bytes / 1e9, temp_gb=report.temp_bytes / 1e9,
               peak_gb=report.peak_bytes / 1e9, hbm_gb=None if hbm is None else hbm / 1e9,
               hbm_use=None if hbm is None else report.peak_bytes / hbm,
               xla_tflop_per_chip=None if report.flops is None else report.flops / 1e12,
               model_tflop_per_chip=model_flops / 1e12, compile_s=report.compile_seconds,
               collectives=report.collectives, **({"hlo_error": report.hlo_error} if report.hlo_error else {}))
    if hlo_path and report.hlo_text is not None:
        from apriel_jax import storage

        storage.write_text(hlo_path, report.hlo_text)
    return row


def format_row(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:11} {r['topology']:11} FAILED: {r['error']}"
    use = "-" if r["hbm_use"] is None else f"{100 * r['hbm_use']:.0f}%"
    fits = "-" if r["hbm_use"] is None else ("yes" if r["hbm_use"] <= HEADROOM else "NO")
    xla = "-" if r["xla_tflop_per_chip"] is None else f"{r['xla_tflop_per_chip']:.1f}"
    mesh = ",".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
    return (f"{name:11} {r['topology']:11} {r['chips']:>5} {mesh:18} {r['batch']:>5}x{r['seq']:<6} "
            f"{r['patches']:>6} {r['remat']:>5} {r['argument_gb']:8.1f} {r['temp_gb']:8.1f} {r['peak_gb']:8.1f} "
            f"{(r['hbm_gb'] or 0):6.0f} {use:>5} {fits:>4} {r['model_tflop_per_chip']:9.1f} {xla:>7} "
            f"{r['compile_s']:8.0f}")


def print_collectives(rows: dict) -> None:
    """The second table: per chip and step, GB moved by each kind of collective (and how many ops)."""
    from apriel_jax.parallel.collectives import KINDS

    print("\ncollectives per chip per step, GB (ops), loop trip counts multiplied in:")
    print(f"{'stage':11} " + " ".join(f"{k:>20}" for k in (*KINDS, "total")))
    for name, row in rows.items():
        found = row.get("collectives")
        if not found:
            print(f"{name:11} {row.get('hlo_error') or row.get('error') or 'no HLO'}")
            continue
        cells = [f"{found[k]['gb']:.2f} ({found[k]['ops']})" for k in (*KINDS, "total")]
        print(f"{name:11} " + " ".join(f"{c:>20}" for c in cells))
        if found.get("loops_counted_once"):
            print(f"{'':11} ({found['loops_counted_once']} loop(s) without a readable trip count counted once)")


HEADER = (f"{'stage':11} {'topology':11} {'chips':>5} {'mesh':18} {'batch x seq':>12} {'patch':>6} "
          f"{'remat':>5} {'args GB':>8} {'temp GB':>8} {'peak GB':>8} {'HBM GB':>6} {'use':>5} {'fits':>4} "
          f"{'model TF':>9} {'XLA TF':>7} {'compile s':>8}")


def _run(args, overrides: list[str]) -> int:
    from apriel_jax.cli import UsageError
    from apriel_jax.utils.config_cli import apply_overrides, load_config_file

    cfg = load_config_file(args.config)
    apply_overrides(cfg, overrides)
    topology = args.topology or (cfg.target.topology if "target" in cfg else "")
    if not topology:
        raise UsageError("no --topology given and the config names no target.topology")
    if args.generate < 0:
        raise UsageError(f"--generate must be >= 1 new tokens (0: the training step), got {args.generate}")
    try:
        cases = stage_cases(cfg, args.stage)
    except ValueError as e:
        raise UsageError(str(e)) from None
    program = (f"KV-cached generation of {args.generate} new tokens after one prompt (batch x seq: the prompt)"
               if args.generate else "the training step")
    print(f"ahead-of-time compile of {program} for {topology}: peak must stay <= {HEADROOM:.0%} of HBM. model TF = analytic "
          "model TFLOP per chip per step; XLA TF = XLA's cost analysis, which counts a scanned layer's loop body "
          "once and no Pallas kernel, so with scanned layers it is far below the real count")
    print(HEADER)
    rows, ok = {}, True
    for name, model_cfg, tcfg in cases:
        try:
            hlo_path = f"{args.hlo.rstrip('/')}/{name}.hlo.txt" if args.hlo else None
            row = compile_case(model_cfg, tcfg, topology, args.num_slices, hlo_path, generate=args.generate)
        except Exception as e:  # an out-of-memory or sharding error at compile time is a result too
            if args.debug:
                raise
            row = dict(topology=topology, error=str(e).splitlines()[0][:200])
        ok = ok and "error" not in row and (row["hbm_use"] is None or row["hbm_use"] <= HEADROOM)
        rows[name] = row
        print(format_row(name, row), flush=True)
    print_collectives(rows)
    if args.json:
        from apriel_jax import storage

        storage.write_json(args.json, rows, sort_keys=False)
    return 0 if ok else 1

