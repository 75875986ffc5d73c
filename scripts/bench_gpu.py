"""Training-step throughput and MFU on one accelerator: jgoat LoRA and GOAT vs HF peft LoRA, ~1B Llama shape, bf16.

Not run in CI. On a GPU host:

    .venv/bin/python scripts/bench_gpu.py                  # TinyLlama-1.1B shape, batch 4 x 1024, bf16
    .venv/bin/python scripts/bench_gpu.py --tiny           # 2-layer shape: checks the script on a CPU in ~2 min

Attention: --attention auto|xla|cudnn sets LlamaConfig.attention_impl of the jgoat rows (auto: cuDNN on a GPU for
bf16, XLA elsewhere; jgoat.models.attention).

Rows (random weights; the same shape, batch and adapter targets q/k/v/o/gate/up/down in every row):
  jgoat LoRA r=8         jgoat.train_step (AdamW, clip 1.0), bf16 base and compute, state donated
  jgoat GOAT r=8 E=8 k=2 the same with GOAT (init "goat": SVD init, frozen residual offset)
  jgoat LoRA r=8, attention xla
                         only when --attention auto resolves to cuDNN (a GPU): the LoRA row again with XLA's
                         attention, to show what the fused kernel buys
  peft LoRA r=8          HF transformers LlamaForCausalLM + peft on torch, bf16, AdamW + clip 1.0, on the same
                         device kind as jax (CUDA for a GPU run, CPU for --tiny); the row is skipped, with the
                         reason, when torch/transformers/peft or a CUDA torch is missing

Each row: median step time over --steps timed steps (after --warmup), tokens/s = batch·seq / median, and MFU =
FLOPs per step / (median · peak). Two FLOP counts are reported:
  * XLA: ``cost_analysis()["flops"]`` of the jgoat step compiled with the layers unrolled (``scan_layers=False``;
    XLA counts a while-loop body once). It is the work XLA actually plans (frozen base: forward + backward to the
    activations, no weight gradients; adapters; attention; remat recompute when --remat is set). The peft row uses
    the jgoat LoRA count (same model, same math).
  * 6·N·tokens (N = all parameters, embeddings included): the usual pre-training convention; a PEFT step does about
    4·N·tokens of it, so this MFU overstates the hardware utilisation by about 1.5x.
The peak bf16 dense FLOP/s comes from PEAK_BF16_TFLOPS by device kind (substring match), or --peak-tflops.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jgoat
from jgoat.models.attention import resolve_attention_impl
from jgoat.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss, unstack_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, from NVIDIA's datasheets; first substring match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)
# TinyLlama-1.1B (Llama-2 architecture with 4 KV heads): 1.10 B parameters.
SHAPE_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4)
SHAPE_TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    step_s: list[float]
    trainable: int
    flops_xla: float | None
    note: str = ""


def peak_tflops(device_kind: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_kind.lower()), None)


def time_steps(step: Callable[[int], None], warmup: int, steps: int) -> list[float]:
    """Wall time of each call after `warmup` untimed calls; `step` must block until its work is done."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - t0)
    return times


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and cost.get("flops") else None


def jgoat_row(name: str, cfg: LlamaConfig, adapter, base, batch, args) -> Row:
    tx = optax.adamw(1e-4)

    def step_fn(model):
        def loss_fn(p, b, rng):
            out, aux = jgoat.apply(model.apply)({"params": p}, b["ids"], b["mask"], aux_mask=b["mask"])
            return causal_lm_loss(out.logits, b["labels"]), aux
        return functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx)

    wrapped = jgoat.wrap(base, adapter, key=jax.random.key(1))
    trainable, frozen = jgoat.split(wrapped)
    state = jgoat.TrainState.create(trainable, tx)
    n_trainable = sum(int(x.size) for x in jax.tree.leaves(trainable))
    key = jax.random.key(2)
    flops = None
    if not args.no_xla_flops:
        unrolled = LlamaForCausalLM(dataclasses.replace(cfg, scan_layers=False))
        unstack = jax.eval_shape(lambda t: unstack_layers(t, cfg.num_hidden_layers), wrapped)
        tr_u, fr_u = jgoat.split(unstack)
        st_u = jax.eval_shape(functools.partial(jgoat.TrainState.create, tx=tx), tr_u)
        flops = xla_flops(jax.jit(step_fn(unrolled)).lower(st_u, fr_u, batch, key).compile())
    compiled = jax.jit(step_fn(LlamaForCausalLM(cfg)), donate_argnums=0).lower(state, frozen, batch, key).compile()
    box = [state]

    def step(i):
        box[0], metrics = compiled(box[0], frozen, batch, key)
        jax.block_until_ready(metrics)

    return Row(name, time_steps(step, args.warmup, args.steps), n_trainable, flops)


def peft_row(name: str, cfg: LlamaConfig, batch, flops: float | None, args) -> Row:
    """The LoRA step with HF peft on torch, on the device kind jax runs on; a Row with a note when unavailable.

    `flops` is jgoat LoRA's XLA count: the same model and math.
    """
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        return Row(name, [], 0, None, f"skipped: {e}")
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and not torch.cuda.is_available():
        return Row(name, [], 0, None, f"skipped: torch {torch.__version__} has no CUDA device")
    device = torch.device("cuda" if on_gpu else "cpu")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False, attn_implementation=args.torch_attention)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch.bfloat16)
    if args.remat:
        model.gradient_checkpointing_enable()
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                                       lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.tensor(np.asarray(batch["ids"]), dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def step(i):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    note = f"torch {torch.__version__}, peft {peft.__version__}, attention {args.torch_attention}"
    return Row(name, time_steps(step, args.warmup, args.steps), sum(p.numel() for p in params), flops, note)


def mfu(flops: float | None, step_s: float, peak: float | None) -> str:
    return f"{100 * flops / step_s / (peak * 1e12):.1f} %" if flops and peak else "–"


def table(rows: list[Row], tokens: int, n_params: int, peak: float | None) -> str:
    lines = ["| row | trainable | median step ms | tokens/s | GFLOP/step (XLA) | MFU (XLA FLOPs) | MFU (6·N·tokens) "
             "| note |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if not r.step_s:
            lines.append(f"| {r.name} | – | – | – | – | – | – | {r.note} |")
            continue
        med = statistics.median(r.step_s)
        gflop = f"{r.flops_xla / 1e9:,.1f}" if r.flops_xla else "–"
        lines.append(f"| {r.name} | {r.trainable:,} | {1e3 * med:.1f} | {tokens / med:,.0f} | {gflop} | "
                     f"{mfu(r.flops_xla, med, peak)} | {mfu(6 * n_params * tokens, med, peak)} | {r.note} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer shape, batch 2 x 128: a CPU check of the script")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; 2 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; 128 with --tiny)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--remat", default=None,
                   help="jgoat remat policy (e.g. full); peft then uses gradient checkpointing")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s (default: by device kind)")
    p.add_argument("--torch-attention", default="sdpa", help="transformers attn_implementation for the peft row")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                   help="attention_impl of the jgoat rows (auto: cuDNN on GPU for bf16, XLA elsewhere)")
    p.add_argument("--no-torch", action="store_true", help="skip the peft row")
    p.add_argument("--no-xla-flops", action="store_true", help="skip the unrolled compile that counts FLOPs")
    p.add_argument("--out", default="BENCHMARKS-gpu.json")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (128 if args.tiny else 1024)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind, args.peak_tflops)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind!r}, "
          f"peak bf16 {peak} TFLOP/s", flush=True)
    cfg = LlamaConfig(**(SHAPE_TINY if args.tiny else SHAPE_1B), max_position_embeddings=max(2048, args.seq),
                      dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy=args.remat,
                      attention_impl=None if args.attention == "auto" else args.attention)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size, jnp.int32)
    batch = {"ids": ids, "mask": jnp.ones_like(ids), "labels": ids}
    base = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), ids)["params"]
    n_params = sum(int(x.size) for x in jax.tree.leaves(base))
    rows = []
    adapters = [(f"jgoat LoRA r={args.rank}", jgoat.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS)),
                (f"jgoat GOAT r={args.rank} E={args.experts} k={args.top_k}",
                 jgoat.GoatConfig(rank=args.rank, experts=args.experts, top_k=args.top_k, targets=TARGETS))]
    runs = [(name, cfg, adapter) for name, adapter in adapters]
    if resolve_attention_impl(cfg.attention_impl, cfg.dtype, cfg.head_dim) != "xla":
        runs.insert(1, (f"{adapters[0][0]}, attention xla", dataclasses.replace(cfg, attention_impl="xla"),
                        adapters[0][1]))
    for name, run_cfg, adapter in runs:
        rows.append(jgoat_row(name, run_cfg, adapter, base, batch, args))
        print(f"{name}: median {1e3 * statistics.median(rows[-1].step_s):.1f} ms", flush=True)
    if not args.no_torch:
        rows.append(peft_row(f"peft LoRA r={args.rank}", cfg, batch, rows[0].flops_xla, args))
    tokens = args.batch * args.seq
    print(f"\n{n_params / 1e9:.3f} B params, {tokens} tokens/step, remat {args.remat}, attention "
          f"{resolve_attention_impl(cfg.attention_impl, cfg.dtype, cfg.head_dim)}\n")
    print(table(rows, tokens, n_params, peak))
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(["python scripts/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
                   "device_kind": device.device_kind, "backend": jax.default_backend(), "peak_tflops": peak,
                   "params": n_params, "tokens_per_step": tokens, "config": vars(args),
                   "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
