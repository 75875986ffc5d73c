"""XLA's compiled memory plan of one Llama-2-7B-shaped LoRA training step at sequence length 2048 (batch 1), with the
attention of whichever jgoat is imported: compare the fused-attention path with the old einsum path by running this
script against each checkout (``PYTHONPATH=<old checkout> python scripts/bench_attention_memory.py`` from outside
the repository, so that the checkout's ``jgoat`` wins). Nothing is allocated (abstract shapes, CPU compile).

    .venv/bin/python scripts/bench_attention_memory.py [--layers 32] [--seq 2048]
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp

import jgoat
from jgoat.memory import GIB, estimate_llama_training, llama2_7b
from jgoat.models.llama import LlamaConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (scanned; 1 for a single layer)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    impl = "xla" if "attention_impl" in {f.name for f in dataclasses.fields(LlamaConfig)} else "einsum (old)"
    print(f"backend: {jax.default_backend()}, jax {jax.__version__}, jgoat from {jgoat.__file__}, attention: {impl}")
    print(f"Llama-2-7B shape, {args.layers} layer(s), batch {args.batch} x {args.seq}, LoRA r=8 all linear, AdamW\n")
    print("| dtype | remat | attention | arguments GiB | temporaries GiB | peak GiB |")
    print("|---|---|---|---|---|---|")
    for dtype in (jnp.bfloat16, jnp.float32):
        for remat in ("full", None):
            model = llama2_7b(dtype=dtype, param_dtype=dtype, remat_policy=remat, num_hidden_layers=args.layers)
            est = estimate_llama_training(model, jgoat.LoraConfig(rank=8, alpha=16, targets=TARGETS),
                                          batch_size=args.batch, seq_len=args.seq)
            print(f"| {jnp.dtype(dtype).name} | {remat} | {impl} | {est.argument_bytes / GIB:.3f} | "
                  f"{est.temp_bytes / GIB:.3f} | {est.peak_bytes / GIB:.3f} |", flush=True)


if __name__ == "__main__":
    main()
