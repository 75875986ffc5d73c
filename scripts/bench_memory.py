"""XLA's compiled memory plan for one training step of the Llama-2-7B shape: full FT, LoRA r=8, GOAT r=8 E=8 k=2 and
full-FT MoE (every MLP upcycled to 8 experts, top-2 router, all trainable: GOAT's Table 7 baseline).

Nothing is allocated (abstract shapes). Batch 4 x 512, remat "full", AdamW. Prints a markdown table per dtype.

    .venv/bin/python scripts/bench_memory.py
"""

import jax
import jax.numpy as jnp

import jgoat
from jgoat.memory import estimate_llama_training, llama2_7b

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = [  # (row, adapter or None for full FT, model overrides)
    ("full FT", None, {}),
    ("LoRA r=8", jgoat.LoraConfig(rank=8, alpha=16, targets=TARGETS), {}),
    ("GOAT r=8 E=8 k=2", jgoat.GoatConfig(rank=8, experts=8, top_k=2, targets=TARGETS), {}),
    ("full-FT MoE, 8 upcycled experts, top-2", None, {"moe_experts": 8, "moe_top_k": 2}),
]


def main() -> None:
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}\n")
    for dtype in (jnp.bfloat16, jnp.float32):
        print(f"### params and compute in {jnp.dtype(dtype).name}\n")
        print("| method | trainable | arguments GiB | temporaries GiB | peak GiB | TFLOP (one scanned layer + head) |")
        print("|---|---|---|---|---|---|")
        for name, cfg, overrides in METHODS:
            model = llama2_7b(dtype=dtype, param_dtype=dtype, **overrides)
            print(estimate_llama_training(model, cfg, batch_size=4, seq_len=512).row(name), flush=True)
        print()


if __name__ == "__main__":
    main()
