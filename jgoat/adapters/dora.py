"""DoRA (weight-decomposed LoRA), as HF PEFT ``LoraConfig(use_dora=True)``.

W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖ with one norm per output unit (a column of the Flax kernel), the norm treated as a
constant in the backward pass, m initialised to ‖W‖. Forward (peft's form, exact):
  y = base + (g − 1) ⊙ (base − b) + g ⊙ s·(dropout(x) A B),   g = m / ‖W + s·A B‖.
With dropout active, peft recomputes `base − b` from the dropped input; so does jgoat.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jgoat.adapters.base import Array, Context, compute_dtype, dropout, kaiming_uniform, low_rank, matmul
from jgoat.adapters.lora import LoraConfig


@struct.dataclass
class DoraAdapter:
    """One DoRA layer: A [in, r], B [r, out], magnitude m [out]."""

    A: Array
    B: Array
    m: Array
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    compute_dtype: str = struct.field(pytree_node=False, default="auto")

    trainable: ClassVar[tuple[str, ...]] = ("A", "B", "m")
    layer_ndim: ClassVar[int] = 2  # ndim of A for one unstacked layer

    @property
    def in_features(self) -> int:
        return self.A.shape[-2]

    def _gain(self, kernel_IxO: Array) -> Array:
        """g = m / ‖W + s·A B‖ per output unit, the norm detached."""
        adapted = kernel_IxO.astype(jnp.float32) + self.scale * (self.A @ self.B)
        norm_O = jax.lax.stop_gradient(jnp.linalg.norm(adapted, axis=0))
        return self.m / norm_O

    def forward(self, x_TxI: Array, y_TxO: Array, ctx: Context) -> tuple[Array, None]:
        g_O = self._gain(ctx.kernel_IxO)
        dtype = compute_dtype(self, x_TxI)
        x = x_TxI.astype(dtype)
        x_drop = dropout(x, self.dropout, ctx.rng)
        if x_drop is x:
            base_no_bias = y_TxO.astype(jnp.float32)
            if ctx.bias_O is not None:
                base_no_bias = base_no_bias - ctx.bias_O.astype(jnp.float32)[None, :]
        else:
            base_no_bias = matmul(x_drop, ctx.kernel_IxO, dtype)
        lora = self.scale * low_rank(x_drop, self.A, self.B, dtype)
        delta = (g_O - 1.0)[None, :] * base_no_bias + g_O[None, :] * lora
        return y_TxO + delta.astype(y_TxO.dtype), None

    def merge(self, kernel_IxO: Array) -> Array:
        adapted = kernel_IxO.astype(jnp.float32) + self.scale * (self.A @ self.B)
        return (adapted * self._gain(kernel_IxO)[None, :]).astype(kernel_IxO.dtype)


def init(cfg: LoraConfig, kernel_IxO: Array, key: Array) -> DoraAdapter:
    n_in, n_out = kernel_IxO.shape
    return DoraAdapter(
        A=kaiming_uniform(key, n_in, (n_in, cfg.rank)),
        B=jnp.zeros((cfg.rank, n_out), jnp.float32),
        m=jnp.linalg.norm(kernel_IxO.astype(jnp.float32), axis=0),
        scale=cfg.scale,
        dropout=cfg.dropout,
        compute_dtype=cfg.compute_dtype,
    )
