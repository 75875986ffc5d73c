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
The diagnostic rows run with --diagnostics (or by name with --only).

Measurement: every variant is compiled (jax) / warmed up first, then the variants run round-robin (ABC.. ABC..,
rotating the starting variant every round) so that CPU contention from other processes hits all of them alike;
each sample is one step's wall time with ``jax.block_until_ready``; medians are reported. XLA's own numbers come from
``jit(f).lower(...).compile()``: ``memory_analysis()`` of the executable that is timed, and ``cost_analysis()``
FLOPs of the same step compiled with the layer scan fully unrolled (XLA counts a while-loop body only once).

    .venv/bin/python scripts/bench_speed.py                 # 4 layers, width 512, seq 128, batch 4, 20 rounds
    .venv/bin/python scripts/bench_speed.py --diagnostics   # + goat_zero, torch_frozen, peft_lora_1t
    .venv/bin/python scripts/bench_speed.py --quick         # smoke run: tiny shapes, 3 rounds (mostly compile time)

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
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jgoat

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
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
def rope_tables(seq: int, head_dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [seq, head_dim] (HF Llama layout: the two halves repeat the frequencies)."""
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


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


# ---------------------------------------------------------------------------------------------------------- torch
def torch_twin(params, args):
    """The same decoder in PyTorch (names as HF Llama), weights copied from the Flax params."""
    import torch

    class TRMSNorm(torch.nn.Module):
        def __init__(self, w, eps=1e-6):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(w))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def t_rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    class TAttention(torch.nn.Module):
        def __init__(self, w, heads, seq, rope):
            super().__init__()
            self.heads, self.rope = heads, rope
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, name, torch.nn.Linear(w, w, bias=False))
            cos, sin = rope_tables(seq, w // heads)
            self.register_buffer("cos", torch.from_numpy(cos)[None, None], persistent=False)
            self.register_buffer("sin", torch.from_numpy(sin)[None, None], persistent=False)
            self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).tril(), persistent=False)

        def forward(self, x):
            b, s, w = x.shape
            hd = w // self.heads
            q, k, v = (p(x).view(b, s, self.heads, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                  self.v_proj))
            if self.rope:
                q = q * self.cos + t_rotate_half(q) * self.sin
                k = k * self.cos + t_rotate_half(k) * self.sin
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            scores = scores.masked_fill(~self.causal, torch.finfo(scores.dtype).min)
            out = torch.softmax(scores, dim=-1) @ v
            return self.o_proj(out.transpose(1, 2).reshape(b, s, w))

    class TMLP(torch.nn.Module):
        def __init__(self, w, inter):
            super().__init__()
            self.gate_proj = torch.nn.Linear(w, inter, bias=False)
            self.up_proj = torch.nn.Linear(w, inter, bias=False)
            self.down_proj = torch.nn.Linear(inter, w, bias=False)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class TLayer(torch.nn.Module):
        def __init__(self, w, heads, inter, seq, rope):
            super().__init__()
            self.input_layernorm = TRMSNorm(w)
            self.self_attn = TAttention(w, heads, seq, rope)
            self.post_attention_layernorm = TRMSNorm(w)
            self.mlp = TMLP(w, inter)

        def forward(self, x):
            h = x + self.self_attn(self.input_layernorm(x))
            return h + self.mlp(self.post_attention_layernorm(h))

    class TDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(TLayer(args.width, args.heads, args.intermediate, args.seq,
                                                     not args.no_rope) for _ in range(args.layers))
            self.norm = TRMSNorm(args.width)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.norm(x)

    model = TDecoder()
    stacked = params["layers"]
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for group, names in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])):
                for name in names:
                    kernel = np.asarray(stacked[group][name]["kernel"][i])
                    getattr(getattr(layer, group), name).weight.copy_(torch.from_numpy(kernel.T.copy()))
            for name in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, name).weight.copy_(torch.from_numpy(np.array(stacked[name]["weight"][i])))
        model.norm.weight.copy_(torch.from_numpy(np.array(params["norm"]["weight"])))
    return model


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
    n_samples = args.warmup + args.repeats
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
    for name, label, cfg, drop in jgoat_rows:
        if not wanted(name):
            continue
        if cfg not in wraps:
            wraps[cfg] = jax.block_until_ready(jgoat.wrap(base, cfg, key=jax.random.key(1)))
            log(f"wrapped {cfg.method} (init {cfg.init})")
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
            twin = torch_twin(base, args)
            with torch.no_grad():
                ref = np.asarray(jax.jit(model.apply)({"params": base}, x))
                parity["max_abs_diff_base_forward"] = float(np.max(np.abs(twin(tx_).numpy() - ref)))

            def threads(n):
                if torch.get_num_threads() != n:
                    torch.set_num_threads(n)

            if wanted("torch_frozen"):
                twin_frozen = torch_twin(base, args).train()
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
                pmodel = peft.get_peft_model(torch_twin(base, args), pcfg)
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

    if not variants:
        raise SystemExit(f"no variant selected by --only {args.only!r}")

    # Warm-up, then the timed round-robin.
    for i in range(args.warmup):
        for v in variants:
            v.step(i)
    log(f"warm-up done; timing {len(variants)} variants x {args.repeats} rounds")
    loads = []
    t_run = time.perf_counter()
    for r in range(args.repeats):
        loads.append(os.getloadavg()[0])
        start = r % len(variants)
        for v in variants[start:] + variants[:start]:
            t0 = time.perf_counter()
            v.step(args.warmup + r)
            v.times.append(time.perf_counter() - t0)
    run_s = time.perf_counter() - t_run
    loads.append(os.getloadavg()[0])

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
    ]
    extra = [
        ("GOAT dropout shared / LoRA", "goat_drop_shared", "lora"),
        ("GOAT dropout per_expert / LoRA", "goat_drop_per_expert", "lora"),
        ("GOAT init=zero / LoRA", "goat_zero", "lora"),
        ("GOAT / frozen fwd+bwd", "goat", "frozen"),
        ("peft LoRA / torch frozen fwd+bwd", "peft_lora", "torch_frozen"),
        ("jax frozen / torch frozen", "frozen", "torch_frozen"),
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
    la = res["machine"]["loadavg_1min_during"]
    lines += ["", f"load average (1 min) during the timed loop: min {la['min']:.2f}, median {la['median']:.2f}, "
              f"max {la['max']:.2f}; timed loop {res['timed_run_s']:.0f}s, whole run {res['total_run_s']:.0f}s"]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
