"""The jitted training step: gradient accumulation, AdamW update, non-finite guard, explicit shardings.

The train state holds the trainable and the frozen parameters as two separate nnx States, so only the
trainable part is differentiated and has optimizer moments. Parameters stay in ``param_dtype`` (fp32
master weights); the model casts them to the compute ``dtype`` (bf16 on accelerators) where they are used.

Loss normalisation: every micro-batch's summed token loss is divided by the number of counted tokens of
the *whole* global batch, so the accumulated gradient is exactly the gradient of the mean token loss of
the global batch, whatever the number of micro-batches or how documents were packed into rows.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apriel_jax.data.batch_check import check_batch_in_debug
from apriel_jax.model.factory import abstract_model, state_shardings
from apriel_jax.model.lora import enabled as lora_enabled
from apriel_jax.parallel.mesh import make_mesh
from apriel_jax.parallel.rules import DEFAULT_RULES, batch_degree, logical_to_spec
from apriel_jax.train.loss import chunked_cross_entropy
from apriel_jax.train.optimizer import Optimizer, split_trainable


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar; advances on every call, including skipped (non-finite) steps
    params: nnx.State  # trainable parameters (differentiated, have optimizer state)
    frozen: nnx.State  # everything else in the model state
    opt_state: Any


def single_device_mesh() -> Mesh:
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


def _opt_state_shardings(abstract_opt_state, params_shardings, replicated):
    """Moments are shaped like the parameters and sharded like them; counters are replicated."""
    params_def = jax.tree.structure(params_shardings)

    def like_params(x):
        return isinstance(x, nnx.State) and jax.tree.structure(x) == params_def

    return jax.tree.map(
        lambda x: params_shardings if like_params(x) else replicated, abstract_opt_state, is_leaf=like_params
    )


def train_state_shardings(cfg, optimizer: Optimizer, mesh: Mesh, trainable: Sequence[str] = ("all",),
                          rules=DEFAULT_RULES) -> TrainState:
    """A TrainState of NamedShardings: parameters by their logical axes, moments like their parameters."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh, frozen_sh = split_trainable(state_shardings(cfg, mesh, rules), trainable)
    abstract_params, _ = split_trainable(nnx.state(abstract_model(cfg)), trainable)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    return TrainState(replicated, params_sh, frozen_sh, _opt_state_shardings(abstract_opt, params_sh, replicated))


def init_train_state(model, optimizer: Optimizer, *, mesh: Mesh | None = None, trainable: Sequence[str] = ("all",),
                     rules=DEFAULT_RULES):
    """(graphdef, TrainState placed on ``mesh``) for a model; the model's arrays are copied, not donated."""
    mesh = mesh or single_device_mesh()
    graphdef, state = nnx.split(model)
    params, frozen = split_trainable(state, trainable)
    sh = train_state_shardings(model.config, optimizer, mesh, trainable, rules)
    # A real copy: a donating step must never free the caller's model arrays, and device_put (even with
    # may_alias=False, jax 0.10.2) shares device 0's buffer when replicating a single-device array.
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=(sh.params, sh.frozen))
    params, frozen = copy((params, frozen))
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    return graphdef, TrainState(step, params, frozen, opt_state)


def _check_graphdef(cfg, graphdef) -> None:
    """The graphdef carries static module attributes (compute dtype, remat policy, attention impl), so a
    graphdef from a model built with another config would silently run that config."""
    built = nnx.merge(graphdef, nnx.state(abstract_model(cfg))).config.to_dict()
    if built != ml_collections.FrozenConfigDict(cfg).to_dict():  # both with tuples (a JSON config has lists)
        diff = sorted(k for k in set(built) | set(cfg) if built.get(k) != cfg.get(k))
        raise ValueError(f"graphdef was built from a different model config (differs in {diff}); "
                         "use the graphdef of a model created from this config")


def make_train_step(cfg, graphdef, optimizer: Optimizer, mesh: Mesh | None = None, *,
                    trainable: Sequence[str] = ("all",), grad_accum_steps: int = 1, chunk_size: int = 1024,
                    z_loss_weight: float = 0.0, lm_head_grad_dtype: str | None = None, rules=DEFAULT_RULES,
                    donate: bool = True, dropout_seed: int = 0) -> Callable:
    """``step(state, batch) -> (new_state, metrics)`` jitted over ``mesh``.

    ``batch`` follows the batch contract (README) with a global batch of B rows, split into
    ``grad_accum_steps`` micro-batches; every micro-batch is sharded along ("data", "fsdp"), so B must be
    a multiple of ``grad_accum_steps * data * fsdp``; under ``APRIEL_DEBUG`` it is checked against the
    contract before the jitted step sees it. Metrics (fp32 scalars): loss (mean token
    cross-entropy), z_loss, grad_norm (before clipping), lr, tokens (counted tokens), skipped (1 when the
    loss, the gradient norm or the update was non-finite and the update was dropped). With ``donate`` the input
    state's buffers are reused for the output and must not be read afterwards. ``lm_head_grad_dtype``
    is the dtype the LM head's gradient is reduced across devices in (default: the compute dtype). A model
    with LoRA dropout draws its masks from ``dropout_seed``, the step counter and the micro-batch index, so
    a resumed run repeats them exactly.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    _check_graphdef(cfg, graphdef)
    mesh = mesh or single_device_mesh()
    accum = grad_accum_steps
    shardings = train_state_shardings(cfg, optimizer, mesh, trainable, rules)
    batch_spec = logical_to_spec(("batch",), mesh, rules)
    degree = batch_degree(mesh, rules)
    batch_sharding = NamedSharding(mesh, batch_spec)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, *batch_spec))
    replicated = NamedSharding(mesh, PartitionSpec())
    compute_dtype = jnp.dtype(cfg.dtype)
    dropout = lora_enabled(cfg) and cfg.lora.dropout > 0

    def loss_fn(params, frozen, micro, total_tokens, dropout_key):
        model = nnx.merge(graphdef, params, frozen)
        hidden, _ = model.hidden_states(micro, dropout_key=dropout_key)
        loss_sum, count, z_sum = chunked_cross_entropy(
            hidden, model.decoder.head(), micro["targets"], micro["loss_mask"], chunk_size=chunk_size,
            z_loss_weight=z_loss_weight, compute_dtype=compute_dtype, grad_reduce_dtype=lm_head_grad_dtype,
        )
        return (loss_sum + z_sum) / total_tokens, jnp.stack([loss_sum, count, z_sum])

    def split_micro(x):
        # Micro-batch i takes rows i, i + A, i + 2A, ...: with B sharded in contiguous blocks, this keeps
        # every micro-batch spread over all data/fsdp devices without moving any row between devices.
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)

    def train_step(state: TrainState, batch):
        total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        micro_batches = {k: split_micro(v) for k, v in batch.items()}
        grad_fn = jax.grad(loss_fn, has_aux=True)
        step_key = jax.random.fold_in(jax.random.key(dropout_seed), state.step) if dropout else None

        def accumulate(carry, micro_and_index):
            grads, sums = carry
            micro, index = micro_and_index
            key = None if step_key is None else jax.random.fold_in(step_key, index)
            g, aux = grad_fn(state.params, state.frozen, micro, total, key)
            return (jax.tree.map(jnp.add, grads, g), sums + aux), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros(3, jnp.float32)),
                                        (micro_batches, jnp.arange(accum)))
        loss_sum, count, z_sum = sums[0], sums[1], sums[2]
        grad_norm = optax.tree.norm(grads)
        updates, new_opt, lr = optimizer.update(grads, state.opt_state, state.params, state.step)
        new_params = optax.apply_updates(state.params, updates)

        # The update is checked too: finite gradients can still make a non-finite update (a NaN or
        # infinite learning rate, an Adam moment that overflowed), and the saved parameters of a
        # diverged run must be the last finite ones.
        update_norm = optax.tree.norm(updates)
        ok = jnp.isfinite(loss_sum) & jnp.isfinite(z_sum) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = TrainState(state.step + 1, keep(new_params, state.params), state.frozen,
                               keep(new_opt, state.opt_state))
        metrics = dict(loss=loss_sum / total, z_loss=z_sum / total, grad_norm=grad_norm, lr=lr, tokens=count,
                       skipped=1.0 - ok.astype(jnp.float32))
        return new_state, metrics

    jitted = jax.jit(train_step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                     donate_argnums=(0,) if donate else ())

    def step(state: TrainState, batch: dict):
        check_batch_in_debug(batch, labels=True)
        rows = {k: v.shape[0] for k, v in batch.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"batch fields disagree on the number of rows: {rows}")
        b = rows["tokens"]
        if b % (accum * degree):
            raise ValueError(
                f"global batch of {b} rows cannot be split into {accum} micro-batch(es) sharded over the "
                f"{degree} devices of mesh axes {batch_spec[0] if len(batch_spec) else ()} "
                f"(data x fsdp); the batch size must be a multiple of {accum * degree}"
            )
        # Traced under the mesh so the model's sharding hints (parallel.rules.constrain) can see it.
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    step.jitted = jitted
    step.mesh = mesh
    step.shardings = shardings
    return step
