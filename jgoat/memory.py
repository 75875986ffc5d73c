"""Peak training memory from XLA's compiled memory analysis, without allocating the model.

Everything is abstract (``jax.eval_shape`` + ``jit(...).lower(...).compile()``): a Llama-2-7B-shaped step compiles
on a laptop CPU. The numbers are what XLA plans for the backend it compiles for (the default backend unless
``backend=`` says otherwise): arguments (params, adapters, optimizer state, batch), outputs, and temporaries
(activations kept for the backward, workspace).

With a ``mesh`` (``jgoat.mesh(fsdp=8)``) the step is the sharded one ``jgoat train --mesh`` runs (params, adapters
and optimizer state placed by :func:`jgoat.shardings`, the batch split over data×fsdp) and every figure is per
device: what one chip of that slice must hold.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jgoat
from jgoat import sharding
from jgoat.core import AdapterConfig
from jgoat.errors import JgoatError
from jgoat.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """XLA's plan for one training step (bytes)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    trainable_params: int
    total_params: int
    flops: float

    @property
    def peak_bytes(self) -> int:
        """Arguments + temporaries + outputs not aliased onto arguments (donated buffers are reused)."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    def row(self, name: str) -> str:
        return (f"| {name} | {self.trainable_params / 1e6:,.1f} M | {self.argument_bytes / GIB:.2f} | "
                f"{self.temp_bytes / GIB:.2f} | {self.peak_bytes / GIB:.2f} | {self.flops / 1e12:.1f} |")


# Plans above this are refused before compiling: no device holds a petabyte, and XLA's CPU buffer assignment aborts
# the whole process (a C++ check failure, not a Python error) on plans near 2^63 bytes.
MAX_PARAM_BYTES = 2**50


def _size(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def estimate_llama_training(
    model_config: LlamaConfig,
    adapter: AdapterConfig | None,
    *,
    batch_size: int,
    seq_len: int,
    learning_rate: float = 1e-4,
    quantize: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> MemoryEstimate:
    """Compile (abstractly) one jgoat train step of a decoder LM and return XLA's memory/FLOP analysis.

    Args:
      model_config: the decoder architecture, incl. ``param_dtype``/``dtype`` (e.g. bf16) and ``remat_policy``.
      adapter: a method config (e.g. ``jgoat.GoatConfig(rank=8, experts=8, top_k=2, targets=[...])``), or None for
        full fine-tuning (every parameter trainable, AdamW state in the parameter dtype).
      batch_size, seq_len: the token batch.
      quantize: QLoRA: store the base's linear kernels as NF4 with double quantisation (``jgoat.quantize_nf4``,
        "all-linear": lm_head and embeddings stay in ``param_dtype``) before wrapping; needs an adapter.
      mesh: plan the sharded step on this mesh (bytes and FLOPs per device); `batch_size` must be divisible by its
        data×fsdp size.

    Returns:
      A MemoryEstimate; ``peak_bytes`` is the figure to compare with the device memory. Train state and batch are
      donated, as a real training loop does.
    """
    split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % split:
        raise JgoatError(f"batch size {batch_size} is not divisible by the data×fsdp = {split} devices it is split "
                         "over: use a multiple of it")
    model = LlamaForCausalLM(model_config)
    ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(ids.shape, ids.dtype))["params"])
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if param_bytes > MAX_PARAM_BYTES:
        raise JgoatError(f"this config has {_size(params):,} parameters ({param_bytes / 2**50:,.0f} PiB), beyond "
                         "any device: check its sizes (hidden_size, intermediate_size, num_hidden_layers, vocab_size)")
    if quantize:
        if adapter is None:
            raise ValueError("quantize=True needs an adapter: a quantised base cannot be fully fine-tuned")
        params = jax.eval_shape(jgoat.quantize_nf4, params)
    if adapter is None:
        wrapped = jax.eval_shape(lambda p: jgoat.mark_trainable(p, sorted(p)), params)
    else:
        wrapped = jax.eval_shape(lambda p: jgoat.wrap(p, adapter, key=jax.random.key(0)), params)
    trainable, frozen = jgoat.split(wrapped)
    tx = optax.adamw(learning_rate)
    state = jax.eval_shape(functools.partial(jgoat.TrainState.create, tx=tx), trainable)

    def loss_fn(p, batch, rng):
        out, aux = jgoat.apply(model.apply)({"params": p}, batch["ids"], batch["mask"], aux_mask=batch["mask"])
        return causal_lm_loss(out.logits, batch["labels"]), aux

    step_fn = functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx)
    if mesh is None:
        step = jax.jit(step_fn, donate_argnums=(0,))
    else:
        trainable_sh, frozen_sh = jgoat.split(sharding.shardings(wrapped, mesh))
        state_sh = sharding.state_shardings(tx, trainable, trainable_sh, mesh)
        step = sharding.sharded_step(step_fn, mesh, state_sh, frozen_sh)
    batch = {"ids": ids, "mask": ids, "labels": ids}
    compiled = step.lower(state, frozen, batch, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return MemoryEstimate(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        trainable_params=_size(trainable),
        total_params=_size(wrapped),
        flops=float(cost.get("flops", 0.0)) if cost else 0.0,
    )


def llama2_7b(**overrides: Any) -> LlamaConfig:
    """The Llama-2-7B architecture (32 layers, width 4096, MLP 11008, 32 heads, vocab 32000), bf16, full remat."""
    defaults = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy="full", scan_layers=True,
                    max_position_embeddings=4096)
    return LlamaConfig(**{**defaults, **overrides})
