"""Training primitives: a pure train step over the adapters only, and optax helpers that freeze the base."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jgoat.errors import JgoatError
from jgoat.wrap import combine, trainable_mask

PyTree = Any
# loss_fn(params, batch, rng) -> (task_loss, aux_loss): params is the full (combined) tree; aux_loss is what
# jgoat.apply returns (0.0 without GOAT), plus any other regulariser the method defines.
LossFn = Callable[[PyTree, Any, jax.Array], tuple[jax.Array, jax.Array]]


@struct.dataclass
class TrainState:
    """What changes during training: step, the trainable tree (adapters and modules_to_save), optimizer state."""

    step: jax.Array
    trainable: PyTree
    opt_state: PyTree

    @classmethod
    def create(cls, trainable: PyTree, tx: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable))


def train_step(
    state: TrainState,
    frozen: PyTree,
    batch: Any,
    rng: jax.Array,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    aux_coeff: float = 1e-3,
    clip_norm: float | None = 1.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the trainable part only; the frozen base gets no gradient and no optimizer state.

    loss = task_loss + aux_coeff · aux (GOAT.md §4: coeff 1e-3), gradients clipped to `clip_norm` (global norm,
    None to disable), then `tx` applied. Pure: jit it with the keyword arguments bound, e.g.
    ``step = jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx))``.

    Args:
      state: TrainState from ``TrainState.create(trainable, tx)``.
      frozen: the frozen half of ``jgoat.split(wrapped)``.
      batch: anything `loss_fn` understands.
      rng: PRNG key for this step (dropout); fold in the step yourself or pass a fresh one.
      loss_fn: ``loss_fn(params, batch, rng) -> (task_loss, aux)``.
      tx: the optax optimizer (e.g. ``jgoat.adamw_cosine(...)``).

    Returns:
      (new state, metrics with loss, task_loss, aux, grad_norm).
    """

    def objective(trainable):
        task, aux = loss_fn(combine(trainable, frozen), batch, rng)
        return task + aux_coeff * aux, (task, aux)

    (loss, (task, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
    return _update(state, grads, tx, clip_norm, {"loss": loss, "task_loss": task, "aux": aux})


def accumulate_step(
    state: TrainState,
    frozen: PyTree,
    micro_batches: Any,
    rng: jax.Array,
    *,
    loss_fn: LossFn,
    weight_fn: Callable[[Any], jax.Array],
    tx: optax.GradientTransformation,
    aux_coeff: float = 1e-3,
    clip_norm: float | None = 1.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step from gradients accumulated over micro-batches (``lax.scan``, one micro-batch live).

    `micro_batches` is a pytree whose leaves have a leading micro-batch axis [A, ...]. `loss_fn`'s task loss must
    be a mean over `weight_fn(micro_batch)` units (examples, or counted tokens for a causal LM): micro-batch i's
    gradient is weighted by w_i / Σ w, so the step equals :func:`train_step` on the concatenated batch exactly (up
    to float summation order) even when micro-batches hold different numbers of counted tokens. GOAT's aux loss is
    a nonlinear function of a batch (load fraction × mean router probability), so it is averaged over micro-batches
    instead (as HF Trainer does). Micro-batch i gets the rng ``fold_in(rng, i)``.

    Returns:
      (new state, metrics with loss, task_loss (the weighted mean), aux (the mean), grad_norm).
    """
    weights = jax.vmap(weight_fn)(micro_batches).astype(jnp.float32)
    share = weights / jnp.maximum(jnp.sum(weights), 1.0)
    count = weights.shape[0]

    def micro(carry, xs):
        i, batch, w = xs

        def objective(trainable):
            task, aux = loss_fn(combine(trainable, frozen), batch, jax.random.fold_in(rng, i))
            return w * task + aux_coeff * aux / count, (task, aux)

        (_, (task, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        total, task_sum, aux_sum = carry
        return (jax.tree.map(jnp.add, total, grads), task_sum + w * task, aux_sum + aux / count), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    start = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, task, aux), _ = jax.lax.scan(micro, start, (jnp.arange(count), micro_batches, share))
    return _update(state, grads, tx, clip_norm, {"loss": task + aux_coeff * aux, "task_loss": task, "aux": aux})


def _update(state: TrainState, grads: PyTree, tx: optax.GradientTransformation, clip_norm: float | None,
            metrics: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """Clip `grads` to `clip_norm` (global norm), apply `tx`, and add grad_norm to the metrics."""
    grad_norm = optax.tree.norm(grads)
    if clip_norm is not None:
        factor = jnp.minimum(1.0, clip_norm / jnp.maximum(grad_norm, 1e-12))
        grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    new = TrainState(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                     opt_state=opt_state)
    return new, {**metrics, "grad_norm": grad_norm}


def adamw_cosine(
    learning_rate: float,
    total_steps: int,
    *,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """The published GOAT schedule (GOAT.md §6): AdamW, linear warmup for `warmup_ratio` of steps, cosine to 0."""
    schedule = cosine_schedule(learning_rate, total_steps, warmup_ratio=warmup_ratio)
    return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def cosine_schedule(learning_rate: float, total_steps: int, *, warmup_ratio: float = 0.03) -> optax.Schedule:
    """transformers' ``get_cosine_schedule_with_warmup`` with ``TrainingArguments``' warmup: linear warmup from 0
    over ``ceil(warmup_ratio · total_steps)`` steps, then a half cosine to 0 at `total_steps` (GOAT's runs use it).

    Args:
      learning_rate: the peak learning rate.
      total_steps: optimizer steps.
      warmup_ratio: fraction of the steps spent warming up, in [0, 1).

    Returns:
      An optax schedule: step -> learning rate (step 0 is the first update).
    """
    if total_steps <= 0:
        raise JgoatError(f"total_steps must be > 0, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise JgoatError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup = math.ceil(total_steps * warmup_ratio)  # TrainingArguments.get_warmup_steps
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(total_steps, warmup + 1))


def freeze_base(tx: optax.GradientTransformation, tree: PyTree, *,
                adapter: str | None = None) -> optax.GradientTransformation:
    """For users who keep ONE tree: `tx` on adapter leaves, exact zero updates (and no state) for the base.

    Uses ``optax.multi_transform`` with ``set_to_zero`` for frozen leaves — never bare ``optax.masked``, which
    passes raw gradients through to the frozen leaves. ``adapter``: on a tree with named adapters, the one to train
    (the others are frozen like the base).
    """
    labels = jax.tree.map(lambda trainable: "train" if trainable else "frozen", trainable_mask(tree, adapter=adapter))
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
