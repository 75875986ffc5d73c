"""XLA's compiled analysis of one bf16 Llama-shaped adapter training step under the two adapter dtype policies:
``compute_dtype="float32"`` (jgoat's earlier behaviour: activations upcast to float32 in every adapted layer) and
``"auto"`` (the default: adapter matmuls in the activation dtype, bf16 here, with float32 accumulation).

For each method it prints, side by side, XLA's memory plan (temporaries, and the peak: arguments + temporaries +
un-aliased outputs) and its cost analysis (FLOPs, bytes accessed) of the jitted ``jgoat.train_step`` (AdamW, train
state donated). Shapes are abstract (nothing is allocated) and the compile is for JAX's default backend (the CPU in
BENCHMARKS.md): compiled-plan numbers, not timings — CPU wall time says nothing about bf16 on an accelerator.
Layers are unrolled (XLA's cost analysis counts a while-loop body once) and not rematerialised (the adapters' saved
activations show in the plan).

    .venv/bin/python scripts/bench_dtype.py [--hidden 2048] [--intermediate 5632] [--layers 4] [--seq 1024]
        [--batch 4] [--out table.md]
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import optax

import jgoat
from jgoat.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 1024**2
POLICIES = ("float32", "auto")


def methods():
    """(name, config factory taking compute_dtype): the adapter families whose step is measured."""
    return [
        ("GOAT r32 E8 k2", lambda cd: jgoat.GoatConfig(rank=32, experts=8, top_k=2, targets=TARGETS, compute_dtype=cd)),
        ("LoRA r16", lambda cd: jgoat.LoraConfig(rank=16, alpha=32, targets=TARGETS, compute_dtype=cd)),
        ("DoRA r16", lambda cd: jgoat.LoraConfig(rank=16, alpha=32, use_dora=True, targets=TARGETS,
                                                  compute_dtype=cd)),
    ]


def analyse(model_config: LlamaConfig, adapter, batch: int, seq: int) -> dict[str, float]:
    """Compile one train step abstractly; XLA's memory plan and cost analysis."""
    model = LlamaForCausalLM(model_config)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(ids.shape, ids.dtype))["params"])
    wrapped = jax.eval_shape(lambda p: jgoat.wrap(p, adapter, key=jax.random.key(0)), params)
    trainable, frozen = jgoat.split(wrapped)
    tx = optax.adamw(1e-4)
    state = jax.eval_shape(functools.partial(jgoat.TrainState.create, tx=tx), trainable)

    def loss_fn(p, data, rng):
        out, aux = jgoat.apply(model.apply)({"params": p}, data["ids"], data["mask"], aux_mask=data["mask"])
        return causal_lm_loss(out.logits, data["labels"]), aux

    step = jax.jit(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx), donate_argnums=(0,))
    data = {"ids": ids, "mask": ids, "labels": ids}
    compiled = step.lower(state, frozen, data, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return {"temp": mem.temp_size_in_bytes / MIB, "peak": peak / MIB, "flops": float(cost.get("flops", 0.0)),
            "bytes": float(cost.get("bytes accessed", 0.0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512, help="small, so the LM head does not dominate the step")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    model_config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_hidden_layers=args.layers, num_attention_heads=args.heads,
                               num_key_value_heads=args.kv_heads, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                               scan_layers=False, max_position_embeddings=max(args.seq, 2048))
    lines = [
        f"bf16 Llama-shaped step: {args.layers} layer(s), hidden {args.hidden}, MLP {args.intermediate}, heads "
        f"{args.heads}/{args.kv_heads}, vocab {args.vocab}, batch {args.batch} x {args.seq}; adapters on "
        f"{', '.join(TARGETS)} (unrolled layers, no remat); AdamW, params and optimizer state float32. XLA CPU compile "
        f"({jax.default_backend()}, jax {jax.__version__}): compiled-plan numbers, not timings.",
        "",
        "| method | temp MiB f32-cast | temp MiB auto | peak MiB f32-cast | peak MiB auto | GB accessed f32-cast "
        "| GB accessed auto | GFLOP f32-cast | GFLOP auto |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name, make in methods():
        t0 = time.perf_counter()
        res = {cd: analyse(model_config, make(cd), args.batch, args.seq) for cd in POLICIES}
        f, a = res["float32"], res["auto"]
        row = (f"| {name} | {f['temp']:,.1f} | {a['temp']:,.1f} ({a['temp'] / f['temp'] - 1:+.0%}) | "
               f"{f['peak']:,.1f} | {a['peak']:,.1f} ({a['peak'] / f['peak'] - 1:+.0%}) | {f['bytes'] / 1e9:.2f} | "
               f"{a['bytes'] / 1e9:.2f} ({a['bytes'] / f['bytes'] - 1:+.0%}) | {f['flops'] / 1e9:.1f} | "
               f"{a['flops'] / 1e9:.1f} |")
        lines.append(row)
        print(row, f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
