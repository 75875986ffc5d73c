"""What every adapter method shares: the layer view handed to `init`, the additive merge, and small math (the
targeting knobs, `AdapterConfig`, live in :mod:`jgoat.core`).

An adapter method is a module in `jgoat/adapters/` exposing
  * a frozen config dataclass (subclass of `AdapterConfig`) that validates on construction,
  * `init(cfg, layer, key) -> adapter` where `adapter` is a pytree node (flax.struct dataclass) holding the arrays of
    ONE layer (unstacked; `wrap` vmaps it over stacked layers), and its static knobs,
  * the node's `forward(x_TxI, y_TxO, ctx) -> (y_TxO, aux)` and, for mergeable methods, `merge` / `unmerge`.
Layout convention (Flax): a linear computes y = x @ W + b with W [in, out]; A is [in, r], B is [r, out] (the
transposes of HF PEFT's lora_A.weight [r, in] and lora_B.weight [out, r]).

Dtype policy (``AdapterConfig.compute_dtype``, copied onto each node): a forward resolves it once with
:func:`compute_dtype` and runs every matmul on activations through :func:`matmul` / :func:`low_rank` (operands in
that dtype, float32 accumulation and result).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jgoat.core import HEAD_NAMES, AdapterConfig, einsum, matmul, resolve_compute_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Context:
    """What a forward pass may need besides the adapter and the input.

    Attributes:
      kernel_IxO: the layer's (frozen) kernel as a 2-D [in, out] matrix, in its stored dtype.
      bias_O: the layer's bias or None.
      rng: a PRNG key for adapter dropout, or None for deterministic (eval) mode.
      token_mask_T: optional {0,1} mask over the flattened tokens (for GOAT's aux loss), or None.
    """

    kernel_IxO: Array
    bias_O: Array | None
    rng: Array | None
    token_mask_T: Array | None


class AdditiveMerge:
    """``merge`` / ``unmerge`` for an adapter whose whole effect is kernel + ``delta_weight()`` (the [in, out] update
    in float32): the sum is taken in float32 and cast back to the kernel's dtype."""

    def merge(self, kernel_IxO: Array) -> Array:
        return (kernel_IxO.astype(jnp.float32) + self.delta_weight()).astype(kernel_IxO.dtype)

    def unmerge(self, kernel_IxO: Array) -> Array:
        return (kernel_IxO.astype(jnp.float32) - self.delta_weight()).astype(kernel_IxO.dtype)


def kaiming_uniform(key: Array, in_features: int, shape: tuple[int, ...]) -> Array:
    """torch's ``kaiming_uniform_(w, a=sqrt(5))`` on a weight with fan_in = in_features: U(±1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; identity when rate == 0 or rng is None (eval)."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def svd_torch_layout(kernel_IxO: Array) -> tuple[Array, Array, Array]:
    """Thin SVD of W = kernelᵀ [out, in] in float32: returns U [out, h], S [h] (descending), Vt [h, in]."""
    w_OxI = kernel_IxO.astype(jnp.float32).T
    u, s, vt = jnp.linalg.svd(w_OxI, full_matrices=False)
    return u, s, vt


def compute_dtype(adapter: Any, x: Array) -> jnp.dtype:
    """The dtype of `adapter`'s matmul operands for input `x` (its static ``compute_dtype`` policy)."""
    return resolve_compute_dtype(adapter.compute_dtype, x.dtype)


def low_rank(x_TxI: Array, a_IxR: Array, b_RxO: Array, dtype: Any) -> Array:
    """x @ A @ B without forming the [in, out] product: both matmuls in `dtype` with float32 accumulation (the
    [T, r] intermediate is rounded to `dtype` between them); a float32 result."""
    return matmul(matmul(x_TxI, a_IxR, dtype), b_RxO, dtype)


def describe(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


__all__ = ["HEAD_NAMES", "AdapterConfig", "AdditiveMerge", "Array", "Context", "compute_dtype", "describe", "dropout",
           "einsum", "kaiming_uniform", "low_rank", "matmul", "svd_torch_layout"]
