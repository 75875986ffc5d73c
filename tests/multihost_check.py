"""One of two processes of a localhost multi-host run (jax.distributed + gloo CPU collectives), run by
tests/test_sharding.py:

    python tests/multihost_check.py PROCESS_ID PORT OUT.json     (4 fake CPU devices per process, 8 in all)

Both processes build the same tiny Llama + GOAT tree, train 3 sharded steps on the global mesh (data=2, fsdp=4), each
process feeding only its own rows of every batch (``jax.make_array_from_process_local_data``), and compare the
gathered adapters with the same 3 steps run by this process alone on one of its devices. Writes what it measured.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import jgoat  # noqa: E402
from jgoat.models import LlamaConfig, LlamaForCausalLM, causal_lm_loss  # noqa: E402


def main(process_id: int, port: int, out_path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = np.asarray(jax.random.randint(jax.random.key(1), (3, 8, 8), 0, 64))  # 3 steps × global batch 8
    params = model.init(jax.random.key(0), ids[0])["params"]
    wrapped = jgoat.wrap(params, jgoat.GoatConfig(rank=8, experts=4, top_k=2), key=jax.random.key(2))
    trainable, frozen = jgoat.split(wrapped)
    tx = optax.adamw(1e-2, eps=1e-3)

    def loss_fn(p, batch, rng):
        out, aux = jgoat.apply(model.apply)({"params": p}, batch)
        return causal_lm_loss(out.logits, batch), aux

    step_fn = functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx)
    local = jax.local_devices()[0]  # the one-process reference, on one device of this process
    ref = jax.device_put(jgoat.TrainState.create(trainable, tx), local)
    ref_frozen = jax.device_put(frozen, local)
    for i in range(3):
        ref, _ = jax.jit(step_fn)(ref, ref_frozen, jax.device_put(ids[i], local), jax.random.key(i))

    mesh = jgoat.mesh(data=2, fsdp=4)
    t_sh, f_sh = jgoat.split(jgoat.shardings(wrapped, mesh))
    state_sh = jgoat.state_shardings(tx, trainable, t_sh, mesh)
    host = jax.tree.map(np.asarray, (trainable, frozen))  # same values on both processes
    state = jgoat.create_state(jax.device_put(host[0], t_sh), tx, state_sh)
    frozen_m = jax.device_put(host[1], f_sh)
    step = jgoat.sharded_step(step_fn, mesh, state_sh, f_sh)
    data = jgoat.batch_sharding(mesh)
    rows = 8 // jax.process_count()
    seen = []
    for i in range(3):
        mine = ids[i][process_id * rows:(process_id + 1) * rows]  # this process's share only
        seen.append(mine[:, 0].tolist())
        batch = jax.make_array_from_process_local_data(data, mine, (8, 8))
        state, metrics = step(state, frozen_m, batch, jax.random.key(i))
    gathered = multihost_utils.process_allgather(state.trainable, tiled=True)
    worst = 0.0
    for a, b in zip(jax.tree.leaves(gathered), jax.tree.leaves(ref.trainable), strict=True):
        b = np.asarray(b)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "global_devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "adapters_rel_err": worst, "first_tokens_seen": seen, "loss": float(metrics["loss"]),
              "ref_first_tokens": ids[:, :, 0].tolist()}
    with open(out_path, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
