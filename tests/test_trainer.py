"""jgoat.fit, the library training loop: the same updates as the bare jitted step, metrics fetched in blocks,
callbacks (live TensorBoard events, checkpoints), non-finite steps stopped or skipped, and the learning-rate schedule
pinned to transformers' scheduler."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import ScannedMLP, low_rank_teacher

import jgoat

D = 16
STEPS = 12


def problem(nan_at=None):
    """A wrapped toy MLP, its MSE loss and a batch source (batch `nan_at` holds a NaN target)."""
    model = ScannedMLP(width=D, hidden=32, layers=2)
    k = jax.random.split(jax.random.key(0), 4)
    base = model.init(k[0], jnp.zeros((1, 4, D)))["params"]
    teacher = low_rank_teacher(base, (k[1], k[2]), rank=2, strength=0.5)
    xs = jax.random.normal(k[3], (STEPS, 8, 4, D))
    ys = np.array(jax.vmap(lambda x: model.apply({"params": teacher}, x))(xs))
    if nan_at is not None:
        ys[nan_at, 0, 0, 0] = np.nan
    wrapped = jgoat.wrap(base, jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["up", "down"], dropout=0.1),
                         key=jax.random.key(1))

    def loss_fn(params, batch, rng):
        out, aux = jgoat.apply(model.apply)({"params": params}, batch[0], rngs={"dropout": rng})
        return jnp.mean((out - batch[1]) ** 2), aux

    return wrapped, loss_fn, lambda step: (xs[step], ys[step])


def test_fit_equals_the_bare_jitted_step_and_fetches_metrics_in_blocks():
    wrapped, loss_fn, batches = problem()
    tx = jgoat.adamw_cosine(1e-2, STEPS)
    key = jax.random.key(7)

    # The reference loop of the README: jit(train_step), fold_in(key, step) as dropout rng, float() each step.
    trainable, frozen = jgoat.split(wrapped)
    state = jgoat.TrainState.create(trainable, tx)
    step = jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx))
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, frozen, batches(i), jax.random.fold_in(key, i))
        losses.append(float(metrics["task_loss"]))

    blocks = []

    class Record(jgoat.Callback):
        def on_metrics(self, loop, rows):
            blocks.append([r["step"] for r in rows])

    result = jgoat.fit(wrapped, loss_fn, batches, tx=tx, steps=STEPS, key=key, callbacks=[Record()], log_every=5,
                       schedule=jgoat.cosine_schedule(1e-2, STEPS))
    assert blocks == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]  # one fetch per 5 steps, the rest at the end
    assert [r["task_loss"] for r in result.history] == losses  # bit-identical, not merely close
    for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(jgoat.split(result.params)[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lrs = [r["lr"] for r in result.history]
    # computed inside the jitted step: XLA may fuse the cosine differently from the eager call, ≤ 1 float32 ulp
    np.testing.assert_allclose(lrs, [float(jgoat.cosine_schedule(1e-2, STEPS)(i)) for i in range(STEPS)], rtol=3e-7)
    # fit trained a copy: the caller's wrapped tree is still usable after the donated steps
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(wrapped))


def test_tensorboard_events_are_readable_while_the_run_goes_on(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wrapped, loss_fn, batches = problem()
    seen = {}

    class ReadLive(jgoat.Callback):
        def on_step_end(self, loop, step):
            if step == 8:  # mid-run: 4 steps still to go, the writer is open
                acc = EventAccumulator(str(tmp_path / "tb"))
                acc.Reload()
                seen[step] = [(e.step, e.value) for e in acc.Scalars("task_loss")]

    result = jgoat.fit(wrapped, loss_fn, batches, tx=jgoat.adamw_cosine(1e-2, STEPS), steps=STEPS,
                       key=jax.random.key(0), log_every=4,
                       callbacks=[jgoat.TensorBoardLogger(tmp_path / "tb"), ReadLive()])
    want = [(r["step"], pytest.approx(r["task_loss"], rel=1e-7)) for r in result.history]  # float32 in the event
    assert seen[8] == want[:8]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("task_loss")] == want


def test_a_nonfinite_step_stops_before_the_next_checkpoint_or_is_skipped(tmp_path):
    wrapped, loss_fn, batches = problem(nan_at=6)  # step index 6: the 7th update
    tx = jgoat.adamw_cosine(1e-2, STEPS)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(jgoat.NonFiniteError, match=r"step 7: non-finite loss \(nan\)"):
        jgoat.fit(wrapped, loss_fn, batches, tx=tx, steps=STEPS, key=jax.random.key(0), log_every=100,
                  callbacks=[jgoat.Checkpoint(ckpt, every=4)])
    assert jgoat.latest_step(ckpt) == 4  # the step-8 save fetched the NaN row first and was never written

    snapshots = {}

    class Snapshot(jgoat.Callback):
        def on_step_end(self, loop, step):
            snapshots[step] = [np.asarray(x).copy() for x in jax.tree.leaves(loop.state.trainable)]

    result = jgoat.fit(wrapped, loss_fn, batches, tx=tx, steps=STEPS, key=jax.random.key(0), nonfinite="skip",
                       callbacks=[Snapshot()])
    assert result.skipped == [7]
    for before, after in zip(snapshots[6], snapshots[7], strict=True):  # the NaN step left the adapters alone
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(a, b) for a, b in zip(snapshots[7], snapshots[8], strict=True))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.params))


@pytest.mark.parametrize("total, ratio", [(110, 0.03), (300, 0.1), (10, 0.0), (1, 0.03), (7, 0.5)])
def test_cosine_schedule_equals_transformers_step_by_step(total, ratio):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    lr = 1e-3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    # transformers 5: warmup_steps < 1 is the ratio (it replaced warmup_ratio); ceil(total · ratio) steps
    args = transformers.TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to=[])
    warmup = args.get_warmup_steps(total)
    scheduler = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    theirs = []
    for _ in range(total):  # the lr each optimizer step uses, as HF Trainer applies it
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    ours = jgoat.cosine_schedule(lr, total, warmup_ratio=ratio)
    assert warmup == math.ceil(total * ratio)  # e.g. 4 at 110 steps and 3 % (rounding would give 3)
    # float32 (optax) vs float64 (torch's LambdaLR): |Δ| ≤ a few float32 ulps of the peak, 2e-7 · lr bounds it
    np.testing.assert_allclose([float(ours(i)) for i in range(total)], theirs, rtol=0, atol=2e-7 * lr)
    if warmup:  # the warmup really is ceil: the last warmup step is below the peak, the next one at it
        assert float(ours(warmup - 1)) < lr and float(ours(warmup)) == pytest.approx(lr, rel=1e-6)
