"""LoRA and the inits that share its forward: rsLoRA, PiSSA (full and randomised SVD), MiLoRA, OLoRA.

Forward: y = x W + b + s · dropout(x) A B, s = alpha / r (rsLoRA: alpha / sqrt(r)).
PiSSA / MiLoRA / OLoRA change the base at init (W ← W − s·A0·B0). jgoat never edits the kernel: it keeps
res_A = A0, res_B = s·B0 as a frozen low-rank offset and computes y = x W − (x res_A) res_B + ..., which is the same
number up to fp32 rounding, leaves the checkpoint bit-identical, and works on a quantised base.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jgoat.adapters.base import (
    AdapterConfig,
    AdditiveMerge,
    Array,
    Context,
    compute_dtype,
    dropout,
    kaiming_uniform,
    low_rank,
    svd_torch_layout,
)

LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "milora", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA family (HF PEFT ``LoraConfig``).

    Attributes:
      rank: r, the adapter rank (> 0).
      alpha: lora_alpha; scaling s = alpha / rank, or alpha / sqrt(rank) with ``use_rslora``.
      init: "kaiming" (peft's default True: A ~ U(±1/sqrt(in)), B = 0), "gaussian" (A ~ N(0, (1/r)²) as peft),
        "pissa", "pissa_niter_K" (randomised SVD with K power iterations), "milora" (bottom r singular triplets;
        MiLoRA's official code uses alpha = rank, i.e. s = 1), "olora" (QR).
      use_rslora: rank-stabilised scaling.
      use_dora: weight-decomposed LoRA (see ``jgoat.adapters.dora``).
    """

    rank: int = 8
    alpha: float = 8.0
    init: str = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False

    method: ClassVar[str] = "lora"

    def __post_init__(self):
        super().__post_init__()  # rank a positive int, alpha finite
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.init not in LORA_INITS and not _NITER.fullmatch(self.init):
            raise ValueError(f"unknown LoRA init {self.init!r}; allowed: {', '.join(LORA_INITS)} (K an integer)")
        if self.use_dora and self.init != "kaiming":
            raise ValueError(f"use_dora=True supports init='kaiming' only, got init={self.init!r}")

    @property
    def reads_base(self) -> bool:
        return self.use_dora or self.init not in ("kaiming", "gaussian")  # SVD / QR inits, DoRA's column norms

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def check_layer(self, path: str, in_features: int, out_features: int) -> None:
        if self.rank > min(in_features, out_features):
            raise ValueError(
                f"rank {self.rank} > min(in, out) = {min(in_features, out_features)} for layer '{path}' "
                f"[{in_features} -> {out_features}]; lower the rank or exclude this layer"
            )


@struct.dataclass
class LoraAdapter(AdditiveMerge):
    """One LoRA layer. A [in, r], B [r, out]; optional frozen offset res_A [in, r], res_B [r, out] (s folded in)."""

    A: Array
    B: Array
    res_A: Array | None = None
    res_B: Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    compute_dtype: str = struct.field(pytree_node=False, default="auto")

    trainable: ClassVar[tuple[str, ...]] = ("A", "B")
    layer_ndim: ClassVar[int] = 2  # ndim of A for one unstacked layer

    @property
    def in_features(self) -> int:
        return self.A.shape[-2]

    def delta_weight(self) -> Array:
        """The [in, out] update this adapter adds to the kernel, offset included, in float32."""
        return self.scale * (self.A @ self.B) - offset_weight(self)

    def forward(self, x_TxI: Array, y_TxO: Array, ctx: Context) -> tuple[Array, None]:
        dtype = compute_dtype(self, x_TxI)
        x_drop = dropout(x_TxI.astype(dtype), self.dropout, ctx.rng)
        delta = self.scale * low_rank(x_drop, self.A, self.B, dtype) - offset(self, x_TxI, dtype)
        return y_TxO + delta.astype(y_TxO.dtype), None


def offset(adapter, x_TxI: Array, dtype) -> Array:
    """x · res_A · res_B (matmuls in `dtype`, float32 result), the frozen low-rank part subtracted from the base
    (0 when the base is unchanged)."""
    if adapter.res_A is None:
        return jnp.zeros((), jnp.float32)
    return low_rank(x_TxI, adapter.res_A, adapter.res_B, dtype)


def offset_weight(adapter) -> Array:
    if adapter.res_A is None:
        return jnp.zeros((), jnp.float32)
    return adapter.res_A @ adapter.res_B


def randomized_svd(w_OxI: Array, rank: int, niter: int, key: Array) -> tuple[Array, Array, Array]:
    """Halko et al. randomised SVD (as torch.svd_lowrank): top-`rank` U [out, r], S [r], Vt [r, in]."""
    omega = jax.random.normal(key, (w_OxI.shape[1], rank), jnp.float32)
    q, _ = jnp.linalg.qr(w_OxI @ omega)
    for _ in range(niter):
        z, _ = jnp.linalg.qr(w_OxI.T @ q)
        q, _ = jnp.linalg.qr(w_OxI @ z)
    u_small, s, vt = jnp.linalg.svd(q.T @ w_OxI, full_matrices=False)
    return q @ u_small, s, vt


def svd_factors(u: Array, s: Array, vt: Array, scale: float) -> tuple[Array, Array]:
    """PiSSA-style factors in Flax layout: A = (diag(√(S/s)) Vᵀ)ᵀ [in, r], B = (U diag(√(S/s)))ᵀ [r, out]."""
    root = jnp.sqrt(s / scale)
    return (root[:, None] * vt).T, (u * root[None, :]).T


def init(cfg: LoraConfig, kernel_IxO: Array, key: Array) -> LoraAdapter:
    """Initialise one (unstacked) layer. kernel_IxO is the frozen [in, out] kernel."""
    n_in, n_out = kernel_IxO.shape
    r, s = cfg.rank, cfg.scale
    if cfg.init == "kaiming":
        return LoraAdapter(
            A=kaiming_uniform(key, n_in, (n_in, r)), B=jnp.zeros((r, n_out), jnp.float32),
            scale=s, dropout=cfg.dropout, compute_dtype=cfg.compute_dtype,
        )
    if cfg.init == "gaussian":
        a = jax.random.normal(key, (n_in, r), jnp.float32) / r
        return LoraAdapter(A=a, B=jnp.zeros((r, n_out), jnp.float32), scale=s, dropout=cfg.dropout,
                           compute_dtype=cfg.compute_dtype)
    if cfg.init == "olora":
        q, rr = jnp.linalg.qr(kernel_IxO.astype(jnp.float32).T)  # W [out, in] = Q R
        a, b = rr[:r].T, q[:, :r].T
    else:
        if cfg.init in ("pissa", "milora"):
            u, sv, vt = svd_torch_layout(kernel_IxO)
            sl = slice(0, r) if cfg.init == "pissa" else slice(sv.shape[0] - r, sv.shape[0])
            u, sv, vt = u[:, sl], sv[sl], vt[sl]
        else:
            niter = int(_NITER.fullmatch(cfg.init).group(1))
            u, sv, vt = randomized_svd(kernel_IxO.astype(jnp.float32).T, r, niter, key)
        a, b = svd_factors(u, sv, vt, s)
    return LoraAdapter(A=a, B=b, res_A=a, res_B=s * b, scale=s, dropout=cfg.dropout, compute_dtype=cfg.compute_dtype)
