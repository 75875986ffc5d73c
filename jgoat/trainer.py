"""The training loop as a library: :func:`fit` runs the jitted train step over a batch source, with callbacks for
evaluation, checkpoints and logging. ``jgoat train`` (jgoat.cli) is a thin layer over it; a notebook calls it the
same way::

    result = jgoat.fit(wrapped, loss_fn, lambda step: batches[step % len(batches)], tx=tx, steps=100,
                       key=jax.random.key(0), callbacks=[jgoat.JsonlLogger("run/metrics.jsonl")])
    tuned = result.params

How the loop stays off the host's critical path:

- The batches of the next `prefetch` steps are produced and put on the device by a background thread while the
  step runs (:mod:`jgoat.pipeline`), in step order, so a resumed run reads exactly what an uninterrupted one did;
  the time the loop still waits for each batch is measured (``FitResult.data_wait_s``, the progress bar's
  ``wait_ms``).
- The train state is donated to the jitted step (XLA reuses its buffers for the new state).
- The step's metrics (and the learning rate, computed inside the step) stay on the device; the loop fetches all the
  pending ones in one transfer every `log_every` steps, or when a callback needs them (:meth:`Loop.flush`, which
  the checkpoint and eval callbacks call first). Nothing else waits on the device.
- A non-finite loss or gradient norm leaves the trainable tree and the optimizer state unchanged (the update is
  dropped inside the step); at the next fetch, ``nonfinite="stop"`` raises :class:`jgoat.errors.NonFiniteError`
  before any later checkpoint is written, ``nonfinite="skip"`` reports the skipped steps and goes on.

Callbacks run in list order at each hook; put loggers after the callbacks that log (eval) so that their final rows
are written before the loggers close. All the jitting happens in :func:`make_step`.

On a device mesh (``fit(..., mesh=jgoat.mesh(data=2, fsdp=4))``) the frozen base and the train state are placed with
:mod:`jgoat.sharding`'s rules (adapters and optimizer state follow their base layer), every batch is split over the
(data, fsdp) axes, and the step is one ``jit`` with explicit in/out shardings and the state donated: the same global
computation as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jgoat import pipeline, sharding
from jgoat.checkpoint import save
from jgoat.errors import JgoatError, NonFiniteError
from jgoat.train import LossFn, TrainState, accumulate_step, train_step
from jgoat.wrap import combine, split

PyTree = Any
NONFINITE = ("stop", "skip")


def make_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    aux_coeff: float = 1e-3,
    clip_norm: float | None = 1.0,
    grad_accum: int = 1,
    weight_fn: Callable[[Any], jax.Array] | None = None,
    schedule: optax.Schedule | None = None,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: TrainState | None = None,
    frozen_shardings: PyTree = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
) -> Callable[[TrainState, PyTree, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted step :func:`fit` runs: ``(state, frozen, batch, key) -> (state, metrics)``, state donated.

    With a `mesh` (and the `state_shardings` / `frozen_shardings` of :func:`jgoat.state_shardings` /
    :func:`jgoat.shardings`) it is :func:`jgoat.sharded_step`: explicit in/out shardings, every batch leaf split
    over `batch_axes` (each micro-batch too under ``grad_accum``), a batch not divisible by them a ValueError.

    The step's dropout rng is ``fold_in(key, state.step)``; with ``grad_accum > 1`` the batch's leading axis is split
    into that many micro-batches (:func:`jgoat.accumulate_step`, weighted by `weight_fn`). A non-finite loss or
    gradient norm keeps the old trainable tree and optimizer state (the step counter still advances, so the data
    position and the rng keys stay those of the step index). `schedule` adds the step's learning rate as ``lr``.
    """
    knobs = dict(loss_fn=loss_fn, tx=tx, aux_coeff=aux_coeff, clip_norm=clip_norm)
    if grad_accum > 1 and weight_fn is None:
        raise JgoatError("grad_accum > 1 needs weight_fn (the units each micro-batch's mean loss averages)")
    if mesh is not None and state_shardings is None:
        raise JgoatError("make_step(mesh=...) needs state_shardings (jgoat.state_shardings) and frozen_shardings")

    def step(state: TrainState, frozen: PyTree, batch: Any, key: jax.Array):
        rng = jax.random.fold_in(key, state.step)
        if grad_accum == 1:
            new, metrics = train_step(state, frozen, batch, rng, **knobs)
        else:
            micro = jax.tree.map(lambda v: v.reshape(grad_accum, -1, *v.shape[1:]), batch)
            if mesh is not None:  # each micro-batch split over the batch axes (not the micro-batches over devices)
                micro = jax.lax.with_sharding_constraint(
                    micro, sharding.batch_sharding(mesh, batch_axes=batch_axes, leading=1))
            new, metrics = accumulate_step(state, frozen, micro, rng, weight_fn=weight_fn, **knobs)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = functools.partial(jax.tree.map, lambda n, o: jnp.where(finite, n, o))
        new = new.replace(trainable=keep(new.trainable, state.trainable), opt_state=keep(new.opt_state,
                                                                                         state.opt_state))
        if schedule is not None:
            metrics = {**metrics, "lr": schedule(state.step)}
        return new, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    return sharding.sharded_step(step, mesh, state_shardings, frozen_shardings, batch_axes=batch_axes)


class Loop:
    """What callbacks see of the running :func:`fit`: ``state``, ``frozen``, ``step`` (completed steps), ``steps``
    (the total), ``batch`` (the last one, on the host), ``data_wait`` (the seconds each step of this call waited
    for its batch), ``params`` (the combined tree), :meth:`flush` and :meth:`log`."""

    def __init__(self, state: TrainState, frozen: PyTree, steps: int, callbacks: Sequence[Callback],
                 nonfinite: str):
        self.state, self.frozen, self.steps, self.step = state, frozen, steps, int(state.step)
        self.batch: Any = None
        self.data_wait: list[float] = []
        self.history: list[dict[str, float]] = []
        self.skipped: list[int] = []
        self._callbacks, self._nonfinite = tuple(callbacks), nonfinite
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []

    @property
    def params(self) -> PyTree:
        return combine(self.state.trainable, self.frozen)

    def flush(self) -> None:
        """Fetch every pending step's metrics (one device→host transfer) and hand the rows to the callbacks."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        fetched = jax.device_get([m for _, m in pending])
        rows = [{"step": s, **{k: float(v) for k, v in m.items()}} for (s, _), m in zip(pending, fetched,
                                                                                          strict=True)]
        bad = [r for r in rows if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))]
        if bad and self._nonfinite == "stop":
            rows = rows[:rows.index(bad[0]) + 1]
        self.log(*rows)
        if bad and self._nonfinite == "stop":
            row = bad[0]
            raise NonFiniteError(f"step {row['step']}: non-finite loss ({row['loss']}) or gradient norm "
                                 f"({row['grad_norm']}): training stopped, that update was not applied and no "
                                 "later checkpoint was written (lower the learning rate, or skip such steps with "
                                 "nonfinite='skip' / --on-nonfinite skip)")
        for row in bad:
            self.skipped.append(row["step"])
            print(f"jgoat: warning: step {row['step']}: non-finite loss ({row['loss']}) or gradient norm "
                  f"({row['grad_norm']}): update skipped", file=sys.stderr)

    def log(self, *rows: Mapping[str, float]) -> None:
        """Record rows (``{"step": s, name: value, ...}``, e.g. eval results) after the pending train metrics."""
        if self._pending:
            self.flush()
        rows = [dict(r) for r in rows]
        self.history += rows
        for cb in self._callbacks:
            cb.on_metrics(self, rows)

    def _dispatch(self, hook: str, *args) -> None:
        for cb in self._callbacks:
            getattr(cb, hook)(self, *args)


class Callback:
    """Hooks :func:`fit` calls (override what you need); `loop` is the running :class:`Loop`.

    ``on_step_begin(loop, step)``: before step index `step` (0-based) runs; ``on_step_end(loop, step)``: after
    `step` steps are complete (metrics may still be on the device: call ``loop.flush()`` if you need them);
    ``on_metrics(loop, rows)``: fetched rows in step order (train rows, and whatever was passed to ``loop.log``);
    ``on_train_begin`` / ``on_train_end``: once each.
    """

    def on_train_begin(self, loop: Loop) -> None:
        pass

    def on_step_begin(self, loop: Loop, step: int) -> None:
        pass

    def on_step_end(self, loop: Loop, step: int) -> None:
        pass

    def on_metrics(self, loop: Loop, rows: list[dict[str, float]]) -> None:
        pass

    def on_train_end(self, loop: Loop) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns: the trained tree, the final state, every row logged during the call, the skipped
    steps and the seconds each step of the call waited for its batch (``data_wait_s``; ~0 when prefetching hides the
    input work)."""

    params: PyTree
    state: TrainState
    history: list[dict[str, float]]
    skipped: list[int]
    data_wait_s: tuple[float, ...] = ()


def fit(
    params: PyTree,
    loss_fn: LossFn,
    batches: Callable[[int], Any] | Iterable[Any],
    *,
    tx: optax.GradientTransformation,
    steps: int,
    key: jax.Array,
    callbacks: Sequence[Callback] = (),
    state: TrainState | None = None,
    grad_accum: int = 1,
    weight_fn: Callable[[Any], jax.Array] | None = None,
    aux_coeff: float = 1e-3,
    clip_norm: float | None = 1.0,
    schedule: optax.Schedule | None = None,
    log_every: int = 50,
    nonfinite: str = "stop",
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Sequence[str | None]]] = (),
    logical: Mapping[str, sharding.MeshAxes] | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    prefetch: int = 2,
) -> FitResult:
    """Train the trainable part of `params` for `steps` optimizer steps.

    Args:
      params: the wrapped tree (``jgoat.wrap`` / ``mark_trainable``); its trainable half is copied, then trained.
      loss_fn: ``loss_fn(params, batch, rng) -> (task_loss, aux)`` as for :func:`jgoat.train_step`.
      batches: ``batches(step) -> batch`` (resumable: the batch of a step index), or an iterable of batches.
      tx: the optax optimizer, e.g. ``jgoat.adamw_cosine(lr, steps)``.
      steps: total optimizer steps (a resumed `state` continues from ``state.step``).
      key: PRNG key; step i's dropout rng is ``fold_in(key, i)``.
      callbacks: :class:`Callback` objects (e.g. :class:`Evaluate`, :class:`Checkpoint`, :class:`JsonlLogger`,
        :class:`TensorBoardLogger`), run in list order.
      state: a restored :class:`jgoat.TrainState` to continue from (donated: do not reuse it afterwards).
      grad_accum, weight_fn: split each batch into micro-batches (see :func:`jgoat.accumulate_step`).
      aux_coeff, clip_norm: as in :func:`jgoat.train_step`.
      schedule: the learning-rate schedule, logged as ``lr``.
      log_every: fetch metrics from the device every this many steps.
      nonfinite: "stop" (raise NonFiniteError) or "skip" (warn) on a non-finite loss or gradient norm.
      mesh: train on this device mesh (:func:`jgoat.mesh`): base, adapters and optimizer state placed by
        :func:`jgoat.shardings` (with `rules` / `logical`), batches split over `batch_axes`, whose size must divide
        the batch (and each micro-batch). None: the default device, as before. With several processes
        (``jax.distributed``), `batches` gives this process's rows of each global batch
        (:func:`jgoat.sharding.process_rows`), placed with :func:`jgoat.sharding.place_batch`.
      prefetch: produce and place the batches of the next this many steps in a background thread while the step
        runs (:class:`jgoat.pipeline.Prefetcher`), in step order; 0: each batch when its step starts. Either way
        step s trains on ``batches(s)`` (an iterable is read ahead by up to `prefetch` items), an error raised
        producing it is raised at step s, and callbacks see the host batch as ``loop.batch``.

    Returns:
      FitResult(params, state, history, skipped steps, data_wait_s: the seconds each step of this call waited for
      its batch).
    """
    if steps <= 0 or log_every <= 0 or grad_accum <= 0:
        raise JgoatError(f"steps, log_every and grad_accum must be > 0, got {steps}, {log_every}, {grad_accum}")
    if prefetch < 0:
        raise JgoatError(f"prefetch must be >= 0 (0: no prefetching), got {prefetch}")
    if nonfinite not in NONFINITE:
        raise JgoatError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    trainable, frozen = split(params)
    knobs = dict(aux_coeff=aux_coeff, clip_norm=clip_norm, grad_accum=grad_accum, weight_fn=weight_fn,
                 schedule=schedule)
    if mesh is None:
        if state is None:
            state = TrainState.create(jax.tree.map(jnp.copy, trainable), tx)  # copied: the step donates its input
        step_fn = make_step(loss_fn, tx, **knobs)
    else:
        trainable_sh, frozen_sh = split(sharding.shardings(params, mesh, rules=rules, logical=logical))
        state_sh = sharding.state_shardings(tx, trainable, trainable_sh, mesh)
        frozen = jax.device_put(frozen, frozen_sh)
        # a fresh state is born sharded (its own buffers: donating it leaves `params` intact); a given one is moved
        state = sharding.create_state(trainable, tx, state_sh) if state is None else jax.device_put(state, state_sh)
        step_fn = make_step(loss_fn, tx, **knobs, mesh=mesh, state_shardings=state_sh, frozen_shardings=frozen_sh,
                            batch_axes=batch_axes)
    next_batch = batches if callable(batches) else functools.partial(lambda it, _: next(it), iter(batches))
    place = jax.device_put if mesh is None else functools.partial(sharding.place_batch, mesh=mesh,
                                                                   batch_axes=batch_axes)
    loop = Loop(state, frozen, steps, callbacks, nonfinite)
    loop._dispatch("on_train_begin")
    with pipeline.Prefetcher(next_batch, place, loop.step, steps, depth=prefetch) as feed:
        loop.data_wait = feed.waits
        for step in range(loop.step, steps):
            loop._dispatch("on_step_begin", step)
            loop.batch, batch = feed.next()
            loop.state, metrics = step_fn(loop.state, frozen, batch, key)
            loop.step = step + 1
            loop._pending.append((step + 1, metrics))
            if loop.step % log_every == 0:
                loop.flush()
            loop._dispatch("on_step_end", loop.step)
    loop.flush()
    loop._dispatch("on_train_end")
    return FitResult(loop.params, loop.state, loop.history, loop.skipped, tuple(loop.data_wait))


# ----------------------------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------------------------


class Evaluate(Callback):
    """Evaluate every `every` steps (before the last) and, with ``at_end``, once after training; rows are logged as
    ``{"step", ["epoch",] "eval/<name>": value}``.

    `fn(params) -> {name: float}`; ``epoch_steps`` adds ``epoch = step / epoch_steps`` to the row.
    """

    def __init__(self, fn: Callable[[PyTree], Mapping[str, float]], every: int | None = None, *,
                 at_end: bool = True, epoch_steps: int | None = None):
        self.fn, self.every, self.at_end, self.epoch_steps = fn, every, at_end, epoch_steps

    def _run(self, loop: Loop, step: int) -> None:
        loop.flush()
        epoch = {"epoch": step / self.epoch_steps} if self.epoch_steps else {}
        loop.log({"step": step, **epoch, **{f"eval/{k}": float(v) for k, v in self.fn(loop.params).items()}})

    def on_step_end(self, loop: Loop, step: int) -> None:
        if self.every and step % self.every == 0 and step < loop.steps:
            self._run(loop, step)

    def on_train_end(self, loop: Loop) -> None:
        if self.at_end:
            self._run(loop, loop.step)


class Checkpoint(Callback):
    """Save adapters and optimizer state (``jgoat.save``) every `every` steps and after the last step, after the
    pending metrics are logged; ``metadata`` is stored with each step, plus ``data_position`` (the step)."""

    def __init__(self, directory: str | os.PathLike, every: int, *, metadata: Mapping[str, Any] | None = None,
                 max_to_keep: int | None = 3):
        self.directory, self.every, self.metadata, self.max_to_keep = directory, every, dict(metadata or {}), \
            max_to_keep

    def on_step_end(self, loop: Loop, step: int) -> None:
        if step % self.every == 0 or step == loop.steps:
            loop.flush()
            save(self.directory, loop.params, step=step, opt_state=loop.state.opt_state,
                 metadata={"data_position": step, **self.metadata}, max_to_keep=self.max_to_keep)


class JsonlLogger(Callback):
    """Append each row to a JSON-lines file, flushed row by row (a killed process loses no written row)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def on_metrics(self, loop: Loop, rows: list[dict[str, float]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                f.flush()


class TensorBoardLogger(Callback):
    """TensorBoard scalar events written as rows arrive (tensorboard's own ``EventFileWriter``, no TensorFlow);
    flushed at every fetch, so ``tensorboard --logdir`` follows the run live."""

    def __init__(self, log_dir: str | os.PathLike):
        from tensorboard.compat.proto import event_pb2, summary_pb2  # optional dependency: pip install tensorboard
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = EventFileWriter(str(log_dir), filename_suffix=f".{os.getpid()}")
        self.log_dir = pathlib.Path(log_dir)

    def on_metrics(self, loop: Loop, rows: list[dict[str, float]]) -> None:
        now = time.time()
        for row in rows:
            values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in row.items()
                      if k not in ("step", "epoch") and isinstance(v, int | float)]
            self._writer.add_event(self._event(wall_time=now, step=int(row["step"]),
                                               summary=self._summary(value=values)))
        self._writer.flush()

    def on_train_end(self, loop: Loop) -> None:
        self._writer.close()


class WandbLogger(Callback):
    """Weights & Biases logging (optional: ``pip install wandb``); ``init`` are ``wandb.init`` keyword arguments."""

    def __init__(self, **init: Any):
        try:
            import wandb
        except ImportError as err:
            raise JgoatError("Weights & Biases logging needs wandb: pip install wandb (or drop --wandb)") from err
        self._run = wandb.init(**init)

    def on_metrics(self, loop: Loop, rows: list[dict[str, float]]) -> None:
        for row in rows:
            self._run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def on_train_end(self, loop: Loop) -> None:
        self._run.finish()


class ProgressBar(Callback):
    """A tqdm bar (on a terminal) with the latest fetched task loss, a throughput from ``units(batch)`` and the mean
    time the loop waited for data per step since the last update (``wait_ms``)."""

    def __init__(self, desc: str, *, units: Callable[[Any], int] | None = None, unit: str = "tok_s"):
        self.desc, self.units, self.unit, self.count, self.seen = desc, units, unit, 0, 0

    def on_train_begin(self, loop: Loop) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=self.desc, initial=loop.step, total=loop.steps, dynamic_ncols=True, disable=None)
        self.t0 = time.perf_counter()

    def on_step_end(self, loop: Loop, step: int) -> None:
        self.count += self.units(loop.batch) if self.units else 0
        self.bar.update(1)

    def on_metrics(self, loop: Loop, rows: list[dict[str, float]]) -> None:
        train = [r for r in rows if "task_loss" in r]
        if train:
            rate = self.count / max(time.perf_counter() - self.t0, 1e-9)
            waits, self.seen = loop.data_wait[self.seen:], len(loop.data_wait)
            wait = {"wait_ms": f"{1e3 * sum(waits) / len(waits):.1f}"} if waits else {}
            self.bar.set_postfix({"loss": f"{train[-1]['task_loss']:.3f}", self.unit: f"{rate:.0f}", **wait})

    def on_train_end(self, loop: Loop) -> None:
        self.bar.close()
