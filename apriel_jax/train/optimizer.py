"""AdamW, the paper's learning-rate schedules, weight-decay masking and trainable/frozen parameter groups.

Parameters are addressed by their "/"-joined path in the model state, e.g. ``decoder/layers/mlp/gate/kernel``.
A stage of the recipe trains a subset of the model (realign: the projector only; some CPT stages keep the
vision tower frozen; a LoRA stage only the adapters, ``.../lora_a`` and ``.../lora_b``; a quantized base,
``model/quant.py``, is frozen and may only carry adapters). Frozen parameters
are split out of the differentiated state, so they get neither gradients nor optimizer moments (for the 15B
model Adam moments alone are 120 GB in fp32).
"""

from __future__ import annotations

import fnmatch
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from apriel_jax.model.factory import param_path
from apriel_jax.model.quant import is_quantized_leaf

# Named groups. "decoder" is the transformer body (layers + final norm); the token embedding and the LM
# head form their own group because stages treat them differently from the layers.
GROUPS: dict[str, tuple[str, ...]] = {
    "all": ("*",),
    "vision": ("vision/*",),
    "projector": ("projector/*",),
    "decoder": ("decoder/layers/*", "decoder/norm/*"),
    "embeddings": ("decoder/embed", "decoder/embed/*", "decoder/lm_head/*"),  # embed/*: stored int8 (model/quant.py)
    "lora": ("*/lora_a", "*/lora_b"),  # LoRA adapters (model/lora.py)
}

# Never decayed: norm scales and biases (decaying them only shrinks a per-channel gain or offset).
NO_DECAY = ("*/scale", "*/bias")
EMBEDDING = ("decoder/embed",)


# ----------------------------------------------------------------------------------------- schedules


def linear_decay(peak_lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
    decay = optax.linear_schedule(peak_lr, 0.0, total_steps - warmup_steps)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def cosine(peak_lr: float, total_steps: int, warmup_fraction: float = 0.1,
           final_lr_fraction: float = 0.0) -> optax.Schedule:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to ``final_lr_fraction * peak``."""
    if total_steps < 1 or not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_fraction < 1, got {total_steps}, {warmup_fraction}")
    warmup_steps = int(round(warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps, decay_steps=total_steps,
        end_value=final_lr_fraction * peak_lr,
    )


# Parts of the model that a text-only step (data.patch_budget 0) never runs. Left trainable there they would
# get zero gradients yet hold optimizer moments (Pixtral-12B's vision tower: 0.4B parameters, 3.2 GB of fp32
# Adam state) and be shrunk by weight decay.
IMAGE_PARTS = ("vision", "projector")


def expand_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    """Group names replaced by their globs; anything else is taken as a glob over "/"-joined paths."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    out: list[str] = []
    for p in patterns:
        out.extend(GROUPS.get(p, (p,)))
    return tuple(out)


def matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _signed(patterns: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(included globs, excluded globs, required glob sets): a pattern written ``!name`` excludes what it
    matches; one written ``&name`` keeps only what it matches (e.g. ``&lora``: the adapters among the rest)."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    plain = [p for p in patterns if not p.startswith(("!", "&"))]
    return (expand_patterns(plain), expand_patterns([p[1:] for p in patterns if p.startswith("!")]),
            tuple(expand_patterns([p[1:]]) for p in patterns if p.startswith("&")))


def trainable_for_step(patterns: Sequence[str], patch_budget: int, adapters: bool = False) -> tuple[str, ...]:
    """The trainable patterns a step actually trains: a text-only step (``patch_budget`` 0) excludes the
    parts only images reach (IMAGE_PARTS), so they stay frozen, unchanged and without optimizer state. With
    LoRA ``adapters`` only the adapters inside the trainable parts train; the base weights are all frozen."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not patch_budget:
        patterns = (*patterns, *(f"!{p}" for p in IMAGE_PARTS))
    return (*patterns, "&lora") if adapters else patterns


def _named(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Whether a "/"-joined path is matched by groups or globs, by no ``!``-pattern and by every ``&``-pattern."""
    include, exclude, required = _signed(patterns)
    return lambda name: (matches(name, include) and not matches(name, exclude)
                         and all(matches(name, globs) for globs in required))


def trainable_filter(patterns: Sequence[str]) -> Callable:
    """An nnx filter ``(path, variable) -> bool`` selecting parameters matched by groups or globs, by no
    ``!``-pattern and by every ``&``-pattern. Only ``nnx.Param`` leaves: quantized weights (model/quant.py)
    never train."""
    named = _named(patterns)
    return lambda path, variable: isinstance(variable, nnx.Param) and named(param_path(path))


def quantized_trained(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The quantized leaves among ``names`` that ``patterns`` would train (they cannot: frozen by design)."""
    named = _named(patterns)
    return [n for n in names if is_quantized_leaf(n) and named(n)]


def _refuse_quantized(names: Sequence[str], patterns: Sequence[str]) -> None:
    trained = quantized_trained(names, patterns)
    if trained:
        raise ValueError(f"trainable {tuple(patterns)} includes quantized weights ({len(trained)} leaves, e.g. "
                         f"{trained[0]!r}), which are frozen: train LoRA adapters on the quantized base "
                         "(lora.rank > 0), exclude the decoder layers from trainable, or load the model without quant")


def split_trainable(state: nnx.State, patterns: Sequence[str]) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) parts of a model state. Each pattern must match something: a typo in a stage
    config would otherwise silently freeze the whole model."""
    names = [param_path(p) for p, _ in nnx.to_flat_state(state)]
    for p in (patterns,) if isinstance(patterns, str) else patterns:
        if not any(matches(n, expand_patterns([p.lstrip("!&")])) for n in names):
            raise ValueError(f"trainable pattern {p!r} matches no parameter; groups: {sorted(GROUPS)}, "
                             f"or a glob over paths like {names[0]!r}")
    _refuse_quantized(names, patterns)
    trainable, frozen = nnx.split_state(state, trainable_filter(patterns), ...)
    if not nnx.to_flat_state(trainable):
        raise ValueError(f"trainable {tuple(patterns)} leaves nothing to train"
                         + (": a text-only stage (data.patch_budget 0) never runs the "
                            "vision tower or the projector" if any(p.startswith("!") for p in patterns) else ""))
    return trainable, frozen


def trainable_param_counts(model_cfg, patterns: Sequence[str]) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of a model config under ``patterns`` (no memory allocated)."""
    from apriel_jax.model.factory import abstract_model
    from apriel_jax.model.layers import count_params

    trainable, frozen = split_trainable(nnx.state(abstract_model(model_cfg), nnx.Param), patterns)
    return count_params(trainable), count_params(frozen)


# ------------------------------------------------------------------------------------- optimizer


def weight_decay_mask(params, *, decay_embeddings: bool = False):
    """Tree of bools like ``params``: True where weight decay applies."""
    excluded = NO_DECAY + (() if decay_embeddings else EMBEDDING)
    return jax.tree_util.tree_map_with_path(lambda path, _: not matches(param_path(path), excluded), params)


class Optimizer(NamedTuple):
    """``tx`` produces unit-learning-rate AdamW updates; the step multiplies them by ``schedule(step)``.

    Keeping the learning rate outside optax makes it a function of the train state's step counter (which
    also advances on skipped non-finite steps) and lets the step report exactly the rate it applied.
    """

    tx: optax.GradientTransformation
    schedule: optax.Schedule

    def init(self, params):
        return self.tx.init(params)

    def update(self, grads, opt_state, params, step):
        """(param updates already scaled by -lr, new opt state, lr)."""
        updates, opt_state = self.tx.update(grads, opt_state, params)
        lr = jnp.asarray(self.schedule(step), jnp.float32)
        return jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates), opt_state, lr


def make_optimizer(schedule: optax.Schedule | float, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, clip_norm: float | None = 1.0,
                   decay_embeddings: bool = False) -> Optimizer:
    """AdamW (decoupled weight decay) with global-norm clipping of the gradients before the moments."""
    if not callable(schedule):
        schedule = optax.constant_schedule(float(schedule))
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(
        learning_rate=1.0, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        mask=lambda params: weight_decay_mask(params, decay_embeddings=decay_embeddings),
    ))
    return Optimizer(optax.chain(*parts), schedule)


def count_moments(opt_state) -> int:
    """Number of scalars in the optimizer state (moments dominate; step counters are a few scalars)."""
    return sum(int(x.size) for x in jax.tree.leaves(opt_state))
