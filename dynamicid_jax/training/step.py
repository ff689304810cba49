"""Train state, optimizer and the jitted update step of either stage.

    state = TrainState(step, rng, trainable, opt_state, model_state)
    step_fn = make_step_fn(stages.get(name), modules, config)   # pure: (state, frozen, constants, batch)
    new_state, metrics = step_fn(state, frozen, constants, batch)

Only `trainable` has optimizer state; `frozen` (the stage's fixed parameters) and `constants`
(null features / prompt states) are separate, never-donated arguments. The per-step RNG is
`fold_in(state.rng, state.step)`, so a restored state replays the same draws.

Gradient accumulation: the global batch is split into `accumulation_steps` micro-batches that
a `lax.scan` visits, summing gradients; clipping and AdamW run once on the mean. The step's
random draws (noise, timesteps, drops) are made for the whole global batch first and split
with the rows, so an anchor update with accumulation equals the one without (up to float
rounding). Stage 2's KeyPointEncoder BatchNorm uses per-micro-batch statistics, so there
accumulation changes the update slightly, as it would in any framework. A non-finite
loss or gradient norm never reaches the parameters: the update is replaced by a no-op and
`metrics["finite"]` is 0 (the trainer then stops or carries on, per config).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from dynamicid_jax.schedulers import noise_table
from dynamicid_jax.training.partition import merge


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the frozen parameters and the input position."""

    step: jax.Array  # () int32, optimizer updates done
    rng: jax.Array  # raw PRNG key data (uint32), folded with the step for each update
    trainable: Any  # nested dict: the parameters that get gradients
    opt_state: Any  # optax state of `trainable` only
    model_state: Any  # nested dict updated without gradients (BatchNorm statistics); {} if none


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """lr * min(1, (step + 1) / warmup) (the first update already moves), then constant or
    cosine decay to 0 at total_steps."""
    warmup = max(int(opt.warmup_steps), 0)
    if opt.schedule == "constant":
        after = optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(opt.lr, max(total_steps - warmup, 1))
    else:
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {opt.schedule!r}")

    def schedule(step):
        ramp = jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * after(jnp.maximum(step - warmup, 0))

    return schedule


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the schedule above; global-norm clipping first (once per update) when > 0."""
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay))
    return optax.chain(*parts)


def init_state(trainable, model_state, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh state at step 0 (run under jit with out_shardings to place it on the mesh)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        trainable=trainable,
        opt_state=tx.init(trainable),
        model_state=model_state,
    )


def _gathered(params, mesh):
    """FSDP's all-gather: use whole parameters inside the step (stored split over `fsdp`).

    Without it XLA's propagation shards activations like the weights (feature axes) and then
    replicates them again; with it activations stay split on the batch axis only, and the
    gradients flow back reduce-scattered into the parameters' own sharding.
    """
    if mesh is None:
        return params
    return jax.lax.with_sharding_constraint(params, NamedSharding(mesh, PartitionSpec()))


def _loss_fn(stage, modules, config: ml_collections.ConfigDict, mesh):
    """-> (loss_fn, draw_fn): loss_fn(trainable, frozen, model_state, constants, batch, draws) ->
    (loss, (metrics, model_state)); draw_fn(rng, batch) -> the per-example draws of `batch`.
    The stage's loss on the base model's noise schedule and latent scale."""
    table = noise_table(modules.scheduler)  # the base model's schedule and prediction type
    scaling = float(modules.vae.config.scaling_factor)
    loss, draw_fn = stage.loss(modules, config, table=table, scaling=scaling)

    def fn(trainable, frozen, model_state, constants, batch, draws):
        return loss(_gathered(merge(trainable, frozen), mesh), model_state, constants, batch, draws)

    return fn, draw_fn


def _micro_batches(batch: Mapping[str, jax.Array], k: int, mesh) -> dict:
    """(B, ...) -> (k, B/k, ...) with micro-batch j = rows j, j+k, ... so that each device's
    rows stay on it (the batch axis is sharded in contiguous blocks)."""
    out = {}
    for name, x in batch.items():
        x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, ("data", "fsdp"))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        out[name] = x
    return out


def make_step_fn(stage, modules, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                 mesh=None):
    """The pure update step of `stage` (a `training.stages` object): (state, frozen, constants,
    batch) -> (state, metrics).

    metrics: loss, grad_norm, learning-rate-free scalars of the loss (drop rates or the two
    stage-2 terms) and `finite` (1.0 when the update was applied). `mesh` (optional) pins
    the micro-batch layout when accumulating.
    """
    k = int(config.optimizer.accumulation_steps)
    if k < 1:
        raise ValueError(f"optimizer.accumulation_steps must be >= 1, got {k}")
    loss_fn, draw_fn = _loss_fn(stage, modules, config, mesh)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, frozen, constants, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        draws = draw_fn(rng, batch)  # for the whole global batch, split below with its rows
        if k == 1:
            (loss, (metrics, model_state)), grads = grad_fn(
                state.trainable, frozen, state.model_state, constants, batch, draws)
        else:
            def body(carry, micro):
                grad_sum, loss_sum, metric_sum, model_state = carry
                (loss, (metrics, model_state)), grads = grad_fn(
                    state.trainable, frozen, model_state, constants, micro["batch"], micro["draws"])
                add = functools.partial(jax.tree.map, jnp.add)
                return (add(grad_sum, grads), loss_sum + loss, add(metric_sum, metrics), model_state), None

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            first = lambda tree: jax.tree.map(lambda x: x[: x.shape[0] // k], tree)  # noqa: E731
            metric_shapes = jax.eval_shape(
                lambda: grad_fn(state.trainable, frozen, state.model_state, constants, first(batch),
                                first(draws))[0][1][0])
            metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
            carry = (zeros, jnp.zeros((), jnp.float32), metric_zeros, state.model_state)
            micro = {"batch": _micro_batches(batch, k, mesh), "draws": _micro_batches(draws, k, mesh)}
            (grad_sum, loss_sum, metric_sum, model_state), _ = jax.lax.scan(body, carry, micro)
            grads = jax.tree.map(lambda g: g / k, grad_sum)
            loss = loss_sum / k
            metrics = jax.tree.map(lambda m: m / k, metric_sum)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        # A non-finite update is never applied: keep every old value (the step still counts).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            trainable=keep(trainable, state.trainable),
            opt_state=keep(opt_state, state.opt_state),
            model_state=keep(model_state, state.model_state),
        )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
        return new_state, metrics

    return step_fn
