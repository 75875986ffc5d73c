"""QLoRA memory: XLA's compiled memory plan for one training step of the Llama-2-7B shape, NF4 base vs bf16 base.

Nothing is allocated (abstract shapes, ``jgoat.memory.estimate_llama_training``). bf16 params and compute, batch
4 x 512, remat "full", AdamW on the adapters; LoRA r=8 (alpha 16) and GOAT r=8 E=8 k=2 on q k v o gate up down.
The NF4 base is ``jgoat.quantize_nf4`` (double quantisation; lm_head and embeddings stay bf16). Prints a markdown
table and, with ``--write``, puts it in BENCHMARKS.md as the "QLoRA memory" section (replacing an older one).

    .venv/bin/python scripts/bench_qlora_memory.py [--write]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

import jgoat
from jgoat.memory import GIB, estimate_llama_training, llama2_7b

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = [
    ("LoRA r=8", jgoat.LoraConfig(rank=8, alpha=16, targets=TARGETS)),
    ("GOAT r=8 E=8 k=2", jgoat.GoatConfig(rank=8, experts=8, top_k=2, targets=TARGETS)),
]
BATCH, SEQ = 4, 512
SECTION = "## QLoRA memory"


def base_bytes(quantize: bool) -> int:
    """Bytes of the frozen base params (embeddings, norms, lm_head, every linear: NF4 codes + statistics)."""
    model = llama2_7b()
    from jgoat.models.llama import LlamaForCausalLM

    params = jax.eval_shape(lambda: LlamaForCausalLM(model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
                            ["params"])
    if quantize:
        params = jax.eval_shape(jgoat.quantize_nf4, params)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))


def table() -> str:
    lines = [f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
             f"Llama-2-7B shape, bf16, batch {BATCH} x {SEQ}, remat full, AdamW\n",
             "| base | method | base weights GiB | trainable | arguments GiB | temporaries GiB | peak GiB | "
             "TFLOP/step |",
             "|---|---|---|---|---|---|---|---|"]
    weights = {q: base_bytes(q) for q in (False, True)}
    for name, cfg in METHODS:
        for quantize in (False, True):
            t0 = time.time()
            est = estimate_llama_training(llama2_7b(), cfg, batch_size=BATCH, seq_len=SEQ, quantize=quantize)
            base = "NF4 (double quant)" if quantize else "bf16"
            lines.append(f"| {base} | {name} | {weights[quantize] / GIB:.2f} | {est.trainable_params / 1e6:,.1f} M | "
                         f"{est.argument_bytes / GIB:.2f} | {est.temp_bytes / GIB:.2f} | {est.peak_bytes / GIB:.2f} | "
                         f"{est.flops / 1e12:.1f} |")
            print(f"  compiled {base} + {name} in {time.time() - t0:.0f} s", flush=True)
    return "\n".join(lines)


def write_section(body: str, path: pathlib.Path) -> None:
    """Insert (or replace) the QLoRA section of BENCHMARKS.md, leaving the other sections as they are."""
    intro = ("XLA's compiled memory plan of one training step (`scripts/bench_qlora_memory.py --write`; abstract "
             "shapes, nothing allocated). The NF4 base (`jgoat.quantize_nf4`: 4-bit codes, blocks of 64, "
             "double-quantised absmax, 4.127 bits per weight; embeddings and lm_head stay bf16) is dequantised per "
             "matmul inside the layer scan, so only one layer's kernels exist in bf16 at a time. Arguments hold the "
             "stored base, the adapters, their AdamW state and the batch.")
    paragraphs = [intro]
    if jax.default_backend() == "cpu":
        linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) * 4 / GIB
        paragraphs.append(
            "On the CPU backend XLA has no bf16 matmul: for the bf16 base it converts every stacked `[32, in, out]` "
            "kernel to fp32 once, before the layer loop (a `convert` in the entry computation), which is "
            f"{linear:.1f} GiB (6.5 B linear weights x 4 B) of the bf16 rows' temporaries. The NF4 rows convert one "
            "layer's dequantised kernels at a time, inside the loop. On a GPU (native bf16 matmuls) the bf16 rows' "
            f"temporaries would be about {linear:.1f} GiB lower, i.e. close to the NF4 rows' (which also hold one "
            "layer's dequantised kernels); that is an estimate, not a measurement. The arguments column does not "
            "depend on the backend.")
    text_body = "\n\n".join(textwrap.fill(p, 120, break_on_hyphens=False) for p in paragraphs)
    section = f"{SECTION}\n\n{text_body}\n\n{body}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="insert the table into BENCHMARKS.md")
    args = parser.parse_args()
    body = table()
    print(body)
    if args.write:
        write_section(body, pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
