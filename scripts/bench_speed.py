"""Train-step speed on CPU, side by side in one run: frozen base vs jgoat LoRA vs jgoat GOAT vs HF peft LoRA.

The model is a Llama-shaped decoder stack defined here twice, once in Flax (nn.scan over layers, the way jgoat
expects stacked layers) and once as a PyTorch twin with the same module names, shapes and weights:
RMSNorm -> causal self-attention (q_proj/k_proj/v_proj/o_proj, no bias, rotary embeddings) -> residual ->
RMSNorm -> SwiGLU MLP (gate_proj/up_proj/down_proj, intermediate ~ 8/3 width rounded up to a multiple of 32) ->
residual; a final RMSNorm and a mean-squared loss on the final hidden state (no embedding table, no LM head: the
batch is a tensor of input embeddings and a regression target).

Rows (every adapter targets q, k, v, o, gate, up, down):
  frozen         jax: loss and grad w.r.t. the input embeddings only (the full backward through the frozen stack)
  lora           jgoat LoRA r=32, jgoat.train_step (AdamW, global-norm clip 1.0), state donated
  goat           jgoat GOAT E=8, k=2, r=32, init "goat", dropout 0
  goat_drop_*    the same with adapter dropout 0.05, dropout_mode "shared" / "per_expert"
  goat_zero      diagnostic: GOAT with init "zero" (MoLoRA init): same routing and experts, no frozen residual offset
  peft_lora      HF peft LoRA r=32 on the torch twin, fp32, model.train(), lora_dropout 0, AdamW + clip 1.0, with
                 torch.set_num_threads(number of CPUs this process may use = the size of XLA's CPU thread pool)
  torch_frozen   diagnostic: the torch twin's loss and grad w.r.t. the input embeddings only (same threads)
  peft_lora_1t   diagnostic: peft_lora with one torch thread (torch's OpenMP regions stall on a shared CPU)
  official_goat  with --official PATH: the official GOAT implementation (github.com/Facico/GOAT-PEFT, its
                 peta.src GOATModel through peft.get_peft_model, as its train_nlg.py) on the same torch twin, weights
                 and batch, E=8, k=2, r=32, init "goat", dropout 0, loss + 1e-3 aux, AdamW + clip 1.0, same torch
                 threads; it runs in the official code's own venv (--official-python) as a worker process
                 (scripts/official_goat_worker.py) whose steps are interleaved with the others
The diagnostic rows run with --diagnostics (or by name with --only).

Measurement: every variant is compiled (jax) / warmed up first, then the variants run round-robin (ABC.. ABC..,
rotating the starting variant every round) so that CPU contention from other processes hits all of them alike;
each sample is one step's wall time with ``jax.block_until_ready``; medians are reported. Foreign load: the 1-minute
load average before and after every round and the CPU time other processes used during it (:class:`LoadMeter`) mark
each round; the medians are those of the unmarked rounds (of all, flagged, when fewer than 3 are clean), and
``--strict`` reruns marked rounds and exits with status 3 when it cannot collect --repeats clean ones. The one-time
cost of adding the adapters is timed too: jgoat ``wrap``'s first call (its jitted inits compiled) and a second call,
beside peft's ``get_peft_model`` (and the official GOAT's). XLA's own numbers come from
``jit(f).lower(...).compile()``: ``memory_analysis()`` of the executable that is timed, and ``cost_analysis()``
FLOPs of the same step compiled with the layer scan fully unrolled (XLA counts a while-loop body only once).

    .venv/bin/python scripts/bench_speed.py                 # 4 layers, width 512, seq 128, batch 4, 20 rounds
    .venv/bin/python scripts/bench_speed.py --diagnostics   # + goat_zero, torch_frozen, peft_lora_1t
    .venv/bin/python scripts/bench_speed.py --quick         # smoke run: tiny shapes, 3 rounds (mostly compile time)
    .venv/bin/python scripts/bench_speed.py --strict --official ../GOAT-PEFT --official-python ../goat-venv/bin/python

Results go to --out as JSON (every sample, medians, paired ratios, XLA numbers, load averages) and to stdout as
markdown tables. See BENCHMARKS.md, "Speed (CPU)".
"""

# ruff: noqa: E402  (OPENBLAS_NUM_THREADS must be set before numpy loads)
from __future__ import annotations

import os

# GOAT's SVD init runs LAPACK through OpenBLAS; with 2 OpenBLAS threads on a shared CPU every small BLAS call waits
# for a descheduled thread (10x slower wraps here). Untimed setup only: XLA's and torch's step kernels do not use it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import functools
import json
import math
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jgoat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_twin import TARGETS, rope_tables, torch_twin  # noqa: E402  (numpy + torch only)

HEAD_DIM = 64
DEFAULT_ROWS = ("frozen", "lora", "goat", "goat_drop_shared", "goat_drop_per_expert", "peft_lora")
DIAGNOSTIC_ROWS = ("goat_zero", "torch_frozen", "peft_lora_1t")
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def with_dropout(tree, rate: float, mode: str):
    """The same wrapped tree with every GOAT adapter's (static) dropout knobs replaced."""
    def swap(node):
        return node.replace(dropout=rate, dropout_mode=mode) if isinstance(node, jgoat.GoatAdapter) else node
    return jax.tree.map(swap, tree, is_leaf=lambda n: isinstance(n, jgoat.GoatAdapter))


# ----------------------------------------------------------------------------------------------------------- flax
def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_BxSxW):
        weight = self.param("weight", nn.initializers.ones, (x_BxSxW.shape[-1],))
        var = jnp.mean(jnp.square(x_BxSxW), axis=-1, keepdims=True)
        return x_BxSxW * jax.lax.rsqrt(var + self.eps) * weight


class Attention(nn.Module):
    heads: int
    rope: bool = True

    @nn.compact
    def __call__(self, x_BxSxW):
        b, s, w = x_BxSxW.shape
        hd = w // self.heads

        def proj(name, x):
            return nn.Dense(w, use_bias=False, name=name)(x)

        q = proj("q_proj", x_BxSxW).reshape(b, s, self.heads, hd)
        k = proj("k_proj", x_BxSxW).reshape(b, s, self.heads, hd)
        v = proj("v_proj", x_BxSxW).reshape(b, s, self.heads, hd)
        if self.rope:
            cos, sin = (jnp.asarray(t)[None, :, None, :] for t in rope_tables(s, hd))
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores_BxHxSxS = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        causal = jnp.tril(jnp.ones((s, s), bool))
        scores_BxHxSxS = jnp.where(causal, scores_BxHxSxS, jnp.finfo(scores_BxHxSxS.dtype).min)
        probs = jax.nn.softmax(scores_BxHxSxS, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, w)
        return proj("o_proj", out)


class MLP(nn.Module):
    intermediate: int

    @nn.compact
    def __call__(self, x_BxSxW):
        w = x_BxSxW.shape[-1]
        gate = nn.Dense(self.intermediate, use_bias=False, name="gate_proj")(x_BxSxW)
        up = nn.Dense(self.intermediate, use_bias=False, name="up_proj")(x_BxSxW)
        return nn.Dense(w, use_bias=False, name="down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    heads: int
    intermediate: int
    rope: bool = True

    @nn.compact
    def __call__(self, x_BxSxW, _):
        h = x_BxSxW + Attention(self.heads, self.rope, name="self_attn")(RMSNorm(name="input_layernorm")(x_BxSxW))
        out = h + MLP(self.intermediate, name="mlp")(RMSNorm(name="post_attention_layernorm")(h))
        return out, None


class Decoder(nn.Module):
    """Llama-shaped stack; `unroll` only changes how XLA lays out the scan (used for FLOP counting)."""

    layers: int
    heads: int
    intermediate: int
    rope: bool = True
    unroll: int = 1

    @nn.compact
    def __call__(self, x_BxSxW):
        stack = nn.scan(DecoderLayer, variable_axes={"params": 0, "jgoat_aux": 0},
                        split_rngs={"params": True, "dropout": True}, length=self.layers, unroll=self.unroll)
        x, _ = stack(self.heads, self.intermediate, self.rope, name="layers")(x_BxSxW, None)
        return RMSNorm(name="norm")(x)


def mse(out, y):
    return jnp.mean(jnp.square(out.astype(jnp.float32) - y))


def twin_of(params, args):
    return torch_twin(params, args.layers, args.width, args.heads, args.intermediate, args.seq, not args.no_rope)


# ------------------------------------------------------------------------------------------------------- harness
@dataclass
class Variant:
    name: str
    label: str
    step: Callable[[int], None]  # runs one step (sample index) and blocks until it is done
    xla: dict = field(default_factory=dict)
    trainable_params: int | None = None
    times: list[float] = field(default_factory=list)


def cost_numbers(compiled) -> dict:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    nan = float("nan")
    return {"flops": float(ca.get("flops", nan)), "bytes_accessed": float(ca.get("bytes accessed", nan)),
            "transcendentals": float(ca.get("transcendentals", 0.0))}


def memory_numbers(compiled) -> dict:
    m = compiled.memory_analysis()
    return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}


def xla_thread_info() -> dict:
    """XLA:CPU sizes its intra-op pool to the CPUs this process may run on (tsl MaxParallelism)."""
    names: dict[str, int] = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
            names[comm] = names.get(comm, 0) + 1
    except OSError:
        pass
    return {"affinity_cpus": len(os.sched_getaffinity(0)), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "process_threads_by_name": names}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _proc_ticks(pid: int | str) -> int:
    """utime + stime of a process, all its threads (clock ticks; 0 where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _busy_ticks() -> int | None:
    """Busy clock ticks of the whole machine since boot (/proc/stat: all but idle and iowait); None off Linux."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(values) - values[3] - (values[4] if len(values) > 4 else 0)


class LoadMeter:
    """Foreign load around one timed round: the 1-min load average before and after it, and the share of the
    machine's CPU time that processes other than this one (and its `children`: the official worker) used during it.

    The round is foreign when ``load1 > own_threads + per_core * cores`` before or after it, or when the foreign CPU
    share exceeds `cpu_share`. Why these: the load average counts runnable threads, ~1-minute damped; the benchmark
    alone keeps at most `own_threads` runnable (one variant at a time, each with XLA's / torch's pool sized to the
    CPUs this process may use), so what is above that is other work; 0.5 per core is half the machine's cores
    wanting CPU on average, where every timed thread shares a core a third of the time or more (a step ~1.3-1.5x
    slower; quieter spells measured here moved the ratios by less than that). The load average lags (a burst shows
    up for a minute after it and a short one barely shows): the CPU share from /proc/stat is exact for the round
    itself, and 10% of the machine (0.2 of a core on 2 cores) is well above a quiet box's background (<2%)."""

    def __init__(self, own_threads: int, per_core: float, cpu_share: float):
        self.own_threads, self.per_core, self.cpu_share = own_threads, per_core, cpu_share
        self.cores = os.cpu_count() or 1
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.children: list[int] = []

    def _own(self) -> int:
        return _proc_ticks("self") + sum(_proc_ticks(pid) for pid in self.children)

    def wait_quiet(self, at_most_s: float) -> None:
        """Sleep until the 1-min load average is under the limit again, at most `at_most_s` seconds."""
        end = time.perf_counter() + at_most_s
        while os.getloadavg()[0] > self.own_threads + self.per_core * self.cores and time.perf_counter() < end:
            time.sleep(5.0)

    def start(self) -> dict:
        return {"load": os.getloadavg(), "busy": _busy_ticks(), "own": self._own(), "t": time.perf_counter()}

    def stop(self, start: dict) -> dict:
        load_after, busy, own, t = os.getloadavg(), _busy_ticks(), self._own(), time.perf_counter()
        share = None
        if busy is not None and start["busy"] is not None:
            foreign = max(0, (busy - start["busy"]) - (own - start["own"]))
            share = foreign / max(1e-9, (t - start["t"]) * self.hz * self.cores)
        limit = self.own_threads + self.per_core * self.cores
        reasons = [f"load1 {x:.2f} > {limit:.2f}" for x in (start["load"][0], load_after[0]) if x > limit][:1]
        if share is not None and share > self.cpu_share:
            reasons.append(f"foreign CPU {share:.0%} > {self.cpu_share:.0%}")
        return {"load_before": list(start["load"]), "load_after": list(load_after), "foreign_cpu_share": share,
                "seconds": t - start["t"], "foreign": bool(reasons), "why": "; ".join(reasons)}


class OfficialWorker:
    """scripts/official_goat_worker.py in the official code's Python: setup at start, then one step per call."""

    def __init__(self, python: str, official: pathlib.Path, base, x, y, args, threads: int, tmp: str):
        inputs = os.path.join(tmp, "official_inputs.npz")
        flat = {"params/" + "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(base)[0]}
        np.savez(inputs, x=np.asarray(x), y=np.asarray(y), **flat)
        cfg = {"layers": args.layers, "width": args.width, "heads": args.heads, "intermediate": args.intermediate,
               "seq": args.seq, "rope": not args.no_rope, "rank": args.rank, "experts": args.experts,
               "top_k": args.top_k, "threads": threads, "aux_coeff": 1e-3}
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_goat_worker.py")
        self.proc = subprocess.Popen([python, script, "--official", str(official), "--inputs", inputs, "--config",
                                      json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        if not self.info.get("ready"):
            raise SystemExit(f"official GOAT worker failed to start: {self.info}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"official GOAT worker ({self.proc.args[0]}) exited with status {code}; its stderr "
                             "above says why")
        return json.loads(line)

    def step(self, i: int) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        if not self._read()["finite"]:
            raise SystemExit("official GOAT step: non-finite loss")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="default: 8/3 width rounded up to a multiple of 32")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout of the goat_drop_* rows")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after compilation")
    p.add_argument("--no-rope", action="store_true")
    p.add_argument("--no-torch", action="store_true", help="skip the torch / peft rows")
    p.add_argument("--only", default="", help="comma-separated subset of variant names (overrides --diagnostics)")
    p.add_argument("--diagnostics", action="store_true",
                   help="add goat_zero, torch_frozen and peft_lora_1t (explain where the time goes)")
    p.add_argument("--no-flops", action="store_true", help="skip the unrolled compile used for XLA FLOP counts")
    p.add_argument("--out", default="BENCHMARKS-speed.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, width 256, seq 64, batch 2, 3 repeats")
    p.add_argument("--official", default=None, type=pathlib.Path,
                   help="a clone of github.com/Facico/GOAT-PEFT: adds the official GOAT step (official_goat row)")
    p.add_argument("--official-python", default=sys.executable,
                   help="the Python of the official code's own venv (its pinned torch / peft / transformers)")
    p.add_argument("--foreign-per-core", type=float, default=0.5,
                   help="a round is under foreign load when the 1-min load average exceeds the benchmark's own "
                        "threads + this many per core (before or after the round)")
    p.add_argument("--foreign-cpu", type=float, default=0.10,
                   help="... or when other processes used more than this share of the machine's CPU time during it")
    p.add_argument("--strict", action="store_true",
                   help="refuse foreign-loaded rounds: rerun them (up to 3x --repeats rounds in all, each after "
                        "waiting up to a minute for the load to fall) and exit with status 3 if fewer than "
                        "--repeats clean rounds were taken")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.seq, args.batch, args.repeats, args.warmup = 2, 256, 64, 2, 3, 1
    if args.intermediate is None:
        args.intermediate = -(-int(8 * args.width / 3) // 32) * 32
    if args.width % HEAD_DIM:
        p.error(f"--width must be a multiple of {HEAD_DIM}")
    args.heads = args.width // HEAD_DIM
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    def wanted(name):
        if only:
            return name in only
        return name in DEFAULT_ROWS or (args.diagnostics and name in DIAGNOSTIC_ROWS)

    load_start = os.getloadavg()
    n_threads = len(os.sched_getaffinity(0))
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {n_threads} CPUs, load {load_start}",
          flush=True)

    model = Decoder(args.layers, args.heads, args.intermediate, rope=not args.no_rope)
    unrolled = Decoder(args.layers, args.heads, args.intermediate, rope=not args.no_rope, unroll=args.layers)
    k_x, k_y, k_init, k_steps = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k_x, (args.batch, args.seq, args.width), jnp.float32)
    y = jax.random.normal(k_y, (args.batch, args.seq, args.width), jnp.float32)
    base = jax.jit(model.init)(k_init, x)["params"]
    n_samples = args.warmup + (3 if args.strict else 1) * args.repeats  # --strict may rerun rounds
    step_keys = list(jax.random.split(k_steps, n_samples))
    jax.block_until_ready(step_keys)
    batch = (x, y)
    variants: list[Variant] = []

    def make_loss(m):
        def loss_fn(params, b, rng):
            out, aux = jgoat.apply(m.apply)({"params": params}, b[0], rngs={"dropout": rng})
            return mse(out, b[1]), aux
        return loss_fn

    # 1. frozen base: forward + backward w.r.t. the input embeddings only.
    if wanted("frozen"):
        def frozen_fn(m):
            return jax.value_and_grad(lambda xx, p, yy: mse(m.apply({"params": p}, xx), yy))

        t0 = time.perf_counter()
        compiled = jax.jit(frozen_fn(model)).lower(x, base, y).compile()
        xla = {"compile_s": time.perf_counter() - t0, **memory_numbers(compiled)}
        if not args.no_flops:
            xla |= cost_numbers(jax.jit(frozen_fn(unrolled)).lower(x, base, y).compile())
        log("compiled frozen")

        def frozen_step(i, c=compiled):
            jax.block_until_ready(c(x, base, y))

        variants.append(Variant("frozen", "frozen base fwd+bwd (grad w.r.t. inputs only)", frozen_step, xla, 0))

    # 2./3. jgoat train steps. The GOAT dropout rows reuse the dropout-0 wrap (same weights, only the static
    # dropout knobs differ), which also saves two SVD inits.
    tx = optax.adamw(1e-4, weight_decay=0.0)
    goat_kw = dict(rank=args.rank, experts=args.experts, top_k=args.top_k, targets=TARGETS)
    lora_cfg = jgoat.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    goat_cfg = jgoat.GoatConfig(**goat_kw)
    jgoat_rows = [
        ("lora", f"jgoat LoRA r={args.rank}", lora_cfg, None),
        ("goat", f"jgoat GOAT E={args.experts} k={args.top_k} r={args.rank}", goat_cfg, None),
        ("goat_drop_shared", f"jgoat GOAT, dropout {args.dropout} shared", goat_cfg, (args.dropout, "shared")),
        ("goat_drop_per_expert", f"jgoat GOAT, dropout {args.dropout} per_expert", goat_cfg,
         (args.dropout, "per_expert")),
        ("goat_zero", "diagnostic: jgoat GOAT init=zero (no frozen residual offset)",
         jgoat.GoatConfig(**goat_kw, init="zero"), None),
    ]
    wraps: dict = {}
    wrap_cost: dict[str, dict] = {}  # the one-time cost of adding the adapters, beside peft's get_peft_model
    for name, label, cfg, drop in jgoat_rows:
        if not wanted(name):
            continue
        if cfg not in wraps:
            t0 = time.perf_counter()
            wraps[cfg] = jax.block_until_ready(jgoat.wrap(base, cfg, key=jax.random.key(1)))
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(jgoat.wrap(base, cfg, key=jax.random.key(2)))
            wrap_cost[f"jgoat {cfg.method} (init {getattr(cfg, 'init', 'kaiming')})"] = {
                "first_call_s": first, "again_s": time.perf_counter() - t0}
            log(f"wrapped {cfg.method} (init {cfg.init}): first call {first:.1f}s (compile included)")
        wrapped = wraps[cfg] if drop is None else with_dropout(wraps[cfg], *drop)
        trainable, frozen = jgoat.split(wrapped)
        trainable = jax.tree.map(jnp.copy, trainable)  # the state is donated; GOAT rows share the wrapped arrays
        state = jgoat.TrainState.create(trainable, tx)
        n_trainable = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(trainable))
        t0 = time.perf_counter()
        step = functools.partial(jgoat.train_step, loss_fn=make_loss(model), tx=tx)
        compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, batch, step_keys[0]).compile()
        compile_s = time.perf_counter() - t0
        xla = {"compile_s": compile_s, **memory_numbers(compiled)}
        if not args.no_flops:
            step_unrolled = functools.partial(jgoat.train_step, loss_fn=make_loss(unrolled), tx=tx)
            xla |= cost_numbers(jax.jit(step_unrolled).lower(state, frozen, batch, step_keys[0]).compile())
        box = [state]

        def jgoat_step(i, c=compiled, box=box, frozen=frozen):
            box[0], metrics = c(box[0], frozen, batch, step_keys[i])
            jax.block_until_ready((box[0], metrics))

        variants.append(Variant(name, label, jgoat_step, xla, n_trainable))
        log(f"compiled {name} ({compile_s:.1f}s), {n_trainable:,} trainable")

    # 4. HF peft LoRA on the torch twin (and diagnostics: torch frozen fwd+bwd, peft with 1 thread).
    torch_info: dict = {}
    parity: dict = {}
    if not args.no_torch and any(wanted(n) for n in ("peft_lora", "peft_lora_1t", "torch_frozen")):
        try:
            import peft
            import torch
        except ImportError as e:  # pragma: no cover - optional
            print(f"skipping torch rows: {e}", file=sys.stderr)
        else:
            torch_info = {"torch": torch.__version__, "peft": peft.__version__,
                          "threads_default": torch.get_num_threads(),
                          "interop_threads": torch.get_num_interop_threads(),
                          "parallel_backend": torch.__config__.parallel_info().splitlines()[-1].strip()}
            torch.set_num_threads(n_threads)
            torch_info["threads_set"] = torch.get_num_threads()
            torch.manual_seed(0)
            tx_ = torch.from_numpy(np.array(x))
            ty_ = torch.from_numpy(np.array(y))
            twin = twin_of(base, args)
            with torch.no_grad():
                ref = np.asarray(jax.jit(model.apply)({"params": base}, x))
                parity["max_abs_diff_base_forward"] = float(np.max(np.abs(twin(tx_).numpy() - ref)))

            def threads(n):
                if torch.get_num_threads() != n:
                    torch.set_num_threads(n)

            if wanted("torch_frozen"):
                twin_frozen = twin_of(base, args).train()
                for p in twin_frozen.parameters():
                    p.requires_grad_(False)

                def torch_frozen_step(i, m=twin_frozen):
                    threads(n_threads)
                    xi = tx_.clone().requires_grad_(True)
                    torch.nn.functional.mse_loss(m(xi), ty_).backward()
                    assert xi.grad is not None

                variants.append(Variant("torch_frozen", "diagnostic: torch twin frozen fwd+bwd (grad w.r.t. inputs)",
                                        torch_frozen_step, {}, 0))
            pcfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
            for name, n, label in (("peft_lora", n_threads, f"HF peft LoRA r={args.rank} (torch eager)"),
                                   ("peft_lora_1t", 1, f"diagnostic: HF peft LoRA r={args.rank}, 1 torch thread")):
                if not wanted(name):
                    continue
                twin_model = twin_of(base, args)
                t0 = time.perf_counter()
                pmodel = peft.get_peft_model(twin_model, pcfg)
                wrap_cost.setdefault("peft LoRA get_peft_model", {"first_call_s": time.perf_counter() - t0})
                pmodel.train()
                ptrain = [p for p in pmodel.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(ptrain, lr=1e-4, weight_decay=0.0)

                def peft_step(i, m=pmodel, opt=opt, ptrain=ptrain, n=n):
                    threads(n)
                    loss = torch.nn.functional.mse_loss(m(tx_), ty_)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(ptrain, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    loss.item()

                variants.append(Variant(name, label, peft_step, {}, sum(p.numel() for p in ptrain)))
            log("built torch twin + peft")

    meter = LoadMeter(n_threads, args.foreign_per_core, args.foreign_cpu)
    official = None
    tmp = tempfile.TemporaryDirectory()
    if args.official is not None and (not only or "official_goat" in only):
        official = OfficialWorker(args.official_python, args.official, base, x, y, args, n_threads, tmp.name)
        meter.children.append(official.info["pid"])
        wrap_cost["official GOAT get_peft_model (init goat)"] = {"first_call_s": official.info["wrap_s"]}
        torch_info["official"] = official.info["versions"]
        variants.append(Variant("official_goat", f"official GOAT E={args.experts} k={args.top_k} r={args.rank} "
                                f"(torch eager, {official.info['versions']['torch']})", official.step, {},
                                official.info["trainable_params"]))
        log(f"official GOAT worker ready (wrap {official.info['wrap_s']:.1f}s)")

    if not variants:
        raise SystemExit(f"no variant selected by --only {args.only!r}")

    # Warm-up, then the timed round-robin.
    for i in range(args.warmup):
        for v in variants:
            v.step(i)
    log(f"warm-up done; timing {len(variants)} variants x {args.repeats} rounds")
    rounds: list[dict] = []  # per round: the load around it, and each variant's time in it
    t_run = time.perf_counter()
    limit = 3 * args.repeats if args.strict else args.repeats
    while len(rounds) < limit and sum(not r["foreign"] for r in rounds) < args.repeats:
        r = len(rounds)
        start = r % len(variants)
        mark = meter.start()
        sample = {}
        for v in variants[start:] + variants[:start]:
            t0 = time.perf_counter()
            v.step(args.warmup + r)
            sample[v.name] = time.perf_counter() - t0
        rounds.append({**meter.stop(mark), "times_s": sample})
        if rounds[-1]["foreign"]:
            log(f"round {r}: foreign load ({rounds[-1]['why']})")
            if args.strict:  # give the other work (and the lagging load average) up to a minute to go away
                meter.wait_quiet(60.0)
    run_s = time.perf_counter() - t_run
    if official is not None:
        official.close()
    tmp.cleanup()
    clean = [r for r in rounds if not r["foreign"]]
    used = clean if len(clean) >= min(3, args.repeats) else rounds  # medians of the clean rounds when there are some
    for v in variants:
        v.times = [r["times_s"][v.name] for r in used]
    loads = [x for r in rounds for x in (r["load_before"][0], r["load_after"][0])]

    med = {v.name: statistics.median(v.times) for v in variants}

    times = {v.name: v.times for v in variants}

    def ratio(a, b):
        return med[a] / med[b] if a in med and b in med else None

    def of_min(a, b):
        return min(times[a]) / min(times[b]) if a in med and b in med else None

    def paired(a, b):
        """Median over rounds of the within-round ratio (both ran in the same round, under about the same load)."""
        if a not in med or b not in med:
            return None
        return statistics.median([ta / tb for ta, tb in zip(times[a], times[b], strict=True)])

    def flop_ratio(a, b):
        fa = next((v.xla.get("flops") for v in variants if v.name == a), None)
        fb = next((v.xla.get("flops") for v in variants if v.name == b), None)
        return fa / fb if fa and fb else None

    targets = [
        ("GOAT / LoRA", "goat", "lora", 1.3),
        ("LoRA / frozen fwd+bwd", "lora", "frozen", 1.5),
        ("jgoat LoRA / peft LoRA", "lora", "peft_lora", 1.0),
        ("jgoat GOAT / official GOAT", "goat", "official_goat", 1.0),
    ]
    extra = [
        ("GOAT dropout shared / LoRA", "goat_drop_shared", "lora"),
        ("GOAT dropout per_expert / LoRA", "goat_drop_per_expert", "lora"),
        ("GOAT init=zero / LoRA", "goat_zero", "lora"),
        ("GOAT / frozen fwd+bwd", "goat", "frozen"),
        ("peft LoRA / torch frozen fwd+bwd", "peft_lora", "torch_frozen"),
        ("jax frozen / torch frozen", "frozen", "torch_frozen"),
        ("official GOAT / peft LoRA", "official_goat", "peft_lora"),
    ]
    result = {
        "command": "python scripts/bench_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: getattr(args, k) for k in ("layers", "width", "seq", "batch", "intermediate", "heads", "rank",
                                                  "experts", "top_k", "dropout", "repeats", "warmup", "quick")}
        | {"rope": not args.no_rope, "tokens_per_step": args.batch * args.seq},
        "machine": {"nproc": os.cpu_count(), "affinity_cpus": n_threads, "cpu_model": cpu_model(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "jax": jax.__version__, "flax": _version("flax"), "optax": optax.__version__,
                    "xla_threads": xla_thread_info(), "torch": torch_info,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "loadavg_1min_during": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}},
        "timed_run_s": run_s,
        "foreign_load": {"rule": f"load1 > {n_threads} own threads + {args.foreign_per_core} x {meter.cores} cores, "
                                 f"or foreign CPU share > {args.foreign_cpu:.0%}",
                         "rounds": len(rounds), "foreign_rounds": len(rounds) - len(clean),
                         "medians_over": "clean rounds" if used is clean else "all rounds (too few clean ones)",
                         "strict": args.strict, "refused": args.strict and len(clean) < args.repeats},
        "rounds": [{k: v for k, v in r.items() if k != "times_s"} for r in rounds],
        "wrap_cost": wrap_cost,
        "total_run_s": time.perf_counter() - _T0,
        "parity": parity,
        "variants": {v.name: {"label": v.label, "median_s": med[v.name], "min_s": min(v.times),
                              "p25_s": float(np.percentile(v.times, 25)), "p75_s": float(np.percentile(v.times, 75)),
                              "trainable_params": v.trainable_params, "xla": v.xla, "times_s": v.times}
                     for v in variants},
        "ratios": {label: {"value": ratio(a, b), "paired": paired(a, b), "of_min": of_min(a, b), "target": t,
                           "met": (ratio(a, b) <= t) if ratio(a, b) else None} for label, a, b, t in targets}
        | {label: {"value": ratio(a, b), "paired": paired(a, b), "of_min": of_min(a, b)} for label, a, b in extra},
        "flop_ratios": {"GOAT / LoRA": flop_ratio("goat", "lora"), "LoRA / frozen": flop_ratio("lora", "frozen"),
                        "GOAT / frozen": flop_ratio("goat", "frozen"),
                        "GOAT init=zero / LoRA": flop_ratio("goat_zero", "lora")},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))
    print(f"\nwrote {args.out}")
    if result["foreign_load"]["refused"]:
        print(f"--strict: only {len(clean)} of {len(rounds)} rounds were free of foreign load (need {args.repeats}): "
              "refused; rerun on a quiet machine", file=sys.stderr)
        raise SystemExit(3)
    return result


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except (ImportError, AttributeError):
        return "?"


def markdown(res: dict) -> str:
    vs = res["variants"]
    ref = vs.get("frozen", {}).get("median_s")
    lora = vs.get("lora", {}).get("median_s")
    lines = [
        "| variant | median ms | p25–p75 ms | min ms | × frozen | × jgoat LoRA | trainable |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in vs.values():
        m = v["median_s"]
        lines.append(f"| {v['label']} | {1e3 * m:.1f} | {1e3 * v['p25_s']:.1f}–{1e3 * v['p75_s']:.1f} | "
                     f"{1e3 * v['min_s']:.1f} | {_fmt(m / ref if ref else None)} | "
                     f"{_fmt(m / lora if lora else None)} | {v['trainable_params'] or 0:,} |")
    lines += ["", "| ratio | of medians | paired (median of per-round ratios) | of minima | target | met |",
              "|---|---:|---:|---:|---:|:-:|"]
    for label, r in res["ratios"].items():
        if r["value"] is None:
            continue
        target = r.get("target")
        met = "" if "met" not in r else ("n/a" if r["met"] is None else ("yes" if r["met"] else "**no**"))
        lines.append(f"| {label} | {_fmt(r['value'])} | {_fmt(r['paired'])} | {_fmt(r['of_min'])} | "
                     f"{'≤ ' + str(target) if target else ''} | {met} |")
    lines += ["", "| XLA (compiled step) | GFLOP | GB accessed | argument MB | output MB | alias MB | temp MB | "
              "compile s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in vs.values():
        x = v["xla"]
        if not x:
            continue
        lines.append(f"| {v['label']} | {_fmt(x.get('flops', 0) / 1e9 or None)} | "
                     f"{_fmt(x.get('bytes_accessed', 0) / 1e9 or None)} | "
                     f"{x['argument'] / 2**20:.1f} | {x['output'] / 2**20:.1f} | {x['alias'] / 2**20:.1f} | "
                     f"{x['temp'] / 2**20:.1f} | {x['compile_s']:.1f} |")
    lines += ["", "| FLOP ratio (XLA) | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in res["flop_ratios"].items() if v is not None]
    if res["wrap_cost"]:
        lines += ["", "| one-time wrap (adapters added to the base) | first call s | again s |", "|---|---:|---:|"]
        lines += [f"| {k} | {w['first_call_s']:.2f} | {_fmt(w.get('again_s'))} |" for k, w in res["wrap_cost"].items()]
    la = res["machine"]["loadavg_1min_during"]
    fl = res["foreign_load"]
    lines += ["", f"load average (1 min) around the timed rounds: min {la['min']:.2f}, median {la['median']:.2f}, "
              f"max {la['max']:.2f}; foreign load ({fl['rule']}) in {fl['foreign_rounds']} of {fl['rounds']} rounds"
              f"{' — NOT A QUIET MEASUREMENT' if fl['foreign_rounds'] else ''}; medians over {fl['medians_over']}; "
              f"timed loop {res['timed_run_s']:.0f}s, whole run {res['total_run_s']:.0f}s"]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
