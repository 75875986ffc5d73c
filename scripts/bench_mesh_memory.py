"""Per-device peak memory of one sharded training step of the Llama-2-7B shape on 1, 4 and 8 FSDP devices.

XLA's compiled memory plan (``jgoat.sharding.compiled_memory``) of ``jgoat.sharded_step`` with the default partition
rules, abstract shapes only (nothing allocated): full fine-tuning, LoRA r=8 and GOAT r=8 E=8 k=2 on every linear
layer of the decoder, and full-FT MoE (every MLP upcycled to 8 experts, top-2, all trainable); bf16 params and
compute, remat "full", AdamW, batch 8 × 512. The devices are CPU devices faked by XLA_FLAGS (set below); the plan is
XLA's CPU plan, which matches the accelerator plan in arguments and outputs but not in temporaries (the CPU backend
keeps a float32 copy of bf16 kernels for its matmuls).

    .venv/bin/python scripts/bench_mesh_memory.py
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jgoat  # noqa: E402
from jgoat.memory import llama2_7b  # noqa: E402
from jgoat.models import LlamaForCausalLM, causal_lm_loss  # noqa: E402
from jgoat.sharding import compiled_memory  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = [  # (row, adapter or None for full FT, model overrides)
    ("full FT", None, {}),
    ("LoRA r=8", jgoat.LoraConfig(rank=8, alpha=16, targets=TARGETS), {}),
    ("GOAT r=8 E=8 k=2", jgoat.GoatConfig(rank=8, experts=8, top_k=2, targets=TARGETS), {}),
    ("full-FT MoE, 8 upcycled experts, top-2", None, {"moe_experts": 8, "moe_top_k": 2}),
]
BATCH, SEQ = 8, 512
GIB = 1024**3


def estimate(cfg, n_devices: int, overrides: dict) -> dict[str, int]:
    model = LlamaForCausalLM(llama2_7b(**overrides))
    ids = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(ids.shape, ids.dtype))["params"])
    if cfg is None:
        wrapped = jax.eval_shape(lambda p: jgoat.mark_trainable(p, sorted(p)), params)
    else:
        wrapped = jax.eval_shape(lambda p: jgoat.wrap(p, cfg, key=jax.random.key(0)), params)
    mesh = jgoat.mesh(data=1, fsdp=n_devices, devices=jax.devices()[:n_devices])
    trainable, frozen = jgoat.split(wrapped)
    t_sh, f_sh = jgoat.split(jgoat.shardings(wrapped, mesh))
    tx = optax.adamw(1e-4)
    state_sh = jgoat.state_shardings(tx, trainable, t_sh, mesh)
    state = jax.eval_shape(functools.partial(jgoat.TrainState.create, tx=tx), trainable)

    def loss_fn(p, batch, rng):
        out, aux = jgoat.apply(model.apply)({"params": p}, batch["ids"], batch["mask"], aux_mask=batch["mask"])
        return causal_lm_loss(out.logits, batch["labels"]), aux

    step = jgoat.sharded_step(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx), mesh, state_sh, f_sh)
    batch = {"ids": ids, "mask": ids, "labels": ids}
    return compiled_memory(step, state, frozen, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))


def main() -> None:
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, batch {BATCH}×{SEQ}\n")
    print("| method | devices (fsdp) | arguments GiB | temporaries GiB | peak GiB per device |")
    print("|---|---|---|---|---|")
    for name, cfg, overrides in METHODS:
        for n in (1, 4, 8):
            t0 = time.time()
            m = estimate(cfg, n, overrides)
            print(f"| {name} | {n} | {m['argument'] / GIB:.2f} | {m['temp'] / GIB:.2f} | {m['peak'] / GIB:.2f} |"
                  f" <!-- {time.time() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
