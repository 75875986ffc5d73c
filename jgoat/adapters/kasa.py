"""KaSA (Wang et al., 2024, "Knowledge-aware Singular-value Adaptation"), as HF PEFT ``LoraConfig(kasa_config=...)``.

  1. The frozen base is truncated to its top singular part: W = U S Vᵀ, the r smallest triplets are dropped
     (``truncation="spec"``, peft: keep min(in, out) − r). jgoat never edits the kernel: the dropped part
     U_d S_d V_dᵀ is kept as a frozen low-rank offset res_A = V_d [in, m], res_B = (U_d S_d)ᵀ [m, out] and subtracted,
     y = x W − (x res_A) res_B + b + ..., the same number as peft's truncated base up to fp32 rounding.
  2. The update is in SVD form with a learnable diagonal: ΔW = s · B diag(Δ) A (torch layout), i.e. in Flax layout
     y += s · ((dropout(x) A) ⊙ Δ) B, s = alpha / r (rsLoRA: alpha / √r). peft's init: A kaiming-uniform (a = √5),
     B = 0, Δ ~ N(0, 1) — so the update is 0 at init, but the model is NOT the base model: it is the truncated base.
  3. The regulariser  β · Σ Δ² + γ · (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)  (torch layout; r × r Gram matrices), summed over
     layers, is `KasaAdapter.regularizer`; ``jgoat.regularizer(params)`` sums it over a tree and the loss_fn adds it
     to the task loss (as peft's ``LoraModel._get_kasa_loss``, which the user adds to the loss).

``truncation="reference"`` reproduces the official code (github.com/juyongjiang/KaSA, its peft fork's
LoraLayer.update_layer): it keeps the top ``in_features − r`` triplets (``svd_rank = self.in_features - r``),
which equals the spec when in ≤ out but drops only max(0, r − (in − out)) triplets when in > out (none once
in − out ≥ r). The official training script's regulariser also differs from peft's (not reproduced here): it uses
the in × in and out × out Gram matrices (‖AᵀA − I_in‖_F + ‖BBᵀ − I_out‖_F in torch layout) and divides the sum by
the number of KaSA layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

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
    matmul,
    svd_torch_layout,
)
from jgoat.adapters.lora import offset, offset_weight

KASA_TRUNCATIONS = ("spec", "reference")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KasaConfig(AdapterConfig):
    """KaSA (HF PEFT ``LoraConfig(r=rank, lora_alpha=alpha, kasa_config=KasaConfig(beta, gamma))``).

    Attributes:
      rank: r (> 0 and < min(in, out) of every target: at least one singular triplet of the base must remain).
      alpha: lora_alpha; s = alpha / rank (alpha / sqrt(rank) with ``use_rslora``). Default 16 (the KaSA scripts
        use r = 8, alpha = 16).
      beta: weight of the singular-value penalty Σ Δ² (>= 0; peft / paper default 1e-4).
      gamma: weight of the orthogonality penalty ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F (>= 0; default 1e-3).
      truncation: "spec" (drop the r smallest triplets, as peft and the paper) or "reference" (the official code:
        keep the top in_features − r triplets; see the module docstring).
      use_rslora: rank-stabilised scaling.

    The regulariser is NOT added automatically: add ``jgoat.regularizer(params)`` to the task loss in the loss_fn.

    Example:
      >>> cfg = jgoat.KasaConfig(rank=8, alpha=16, targets="all-linear")
      >>> def loss_fn(params, batch, rng):
      ...     out, aux = jgoat.apply(model.apply)({"params": params}, batch["x"])
      ...     return task_loss(out, batch) + jgoat.regularizer(params), aux
    """

    rank: int = 8
    alpha: float = 16.0
    beta: float = 1e-4
    gamma: float = 1e-3
    truncation: str = "spec"
    use_rslora: bool = False

    method: ClassVar[str] = "kasa"

    def __post_init__(self):
        super().__post_init__()  # rank a positive int, the floats finite
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        for name in ("beta", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.truncation not in KASA_TRUNCATIONS:
            raise ValueError(f"unknown truncation {self.truncation!r}; allowed: {', '.join(KASA_TRUNCATIONS)}")

    @property
    def reads_base(self) -> bool:
        return True  # the truncated SVD of the base

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def check_layer(self, path: str, in_features: int, out_features: int) -> None:
        h = min(in_features, out_features)
        if self.rank >= h:
            raise ValueError(
                f"KaSA needs rank {self.rank} < min(in, out) = {h} for layer '{path}' [{in_features} -> "
                f"{out_features}] so that at least one singular triplet of the base is kept; lower the rank or "
                "exclude this layer"
            )

    def n_dropped(self, in_features: int, out_features: int) -> int:
        """How many of the smallest singular triplets the truncation removes from a [in → out] base."""
        h = min(in_features, out_features)
        if self.truncation == "spec":
            return self.rank
        return h - min(h, in_features - self.rank)


@struct.dataclass
class KasaAdapter(AdditiveMerge):
    """One KaSA layer: A [in, r], B [r, out], diag Δ [r]; the dropped base part res_A [in, m], res_B [m, out]
    (None when the truncation drops nothing); static s, dropout, β, γ.

    ``merge`` gives the truncated base plus the update (what peft's merge_and_unload holds); ``unmerge`` gives back
    the ORIGINAL (untruncated) kernel: jgoat keeps the dropped part, peft cannot."""

    A: Array
    B: Array
    diag: Array
    res_A: Array | None = None
    res_B: Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    beta: float = struct.field(pytree_node=False, default=1e-4)
    gamma: float = struct.field(pytree_node=False, default=1e-3)
    compute_dtype: str = struct.field(pytree_node=False, default="auto")

    trainable: ClassVar[tuple[str, ...]] = ("A", "B", "diag")
    layer_ndim: ClassVar[int] = 2  # ndim of A for one unstacked layer

    @property
    def in_features(self) -> int:
        return self.A.shape[-2]

    def update_weight(self) -> Array:
        """s · A diag(Δ) B, the [in, out] trainable update (Flax layout), float32."""
        return self.scale * ((self.A * self.diag[..., None, :]) @ self.B)

    def delta_weight(self) -> Array:
        """What the adapter adds to the kernel: the update minus the truncated base part, float32."""
        return self.update_weight() - offset_weight(self)

    def forward(self, x_TxI: Array, y_TxO: Array, ctx: Context) -> tuple[Array, None]:
        dtype = compute_dtype(self, x_TxI)
        x_drop = dropout(x_TxI.astype(dtype), self.dropout, ctx.rng)
        h_TxR = matmul(x_drop, self.A, dtype) * self.diag[None, :]
        delta = self.scale * matmul(h_TxR, self.B, dtype) - offset(self, x_TxI, dtype)
        return y_TxO + delta.astype(y_TxO.dtype), None

    def regularizer(self) -> Array:
        """β · Σ Δ² + γ · (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) in torch layout (peft's `_kasa_layer_regularization_loss`),
        summed over stacked layers. In Flax layout the r × r Gram matrices are AᵀA and B Bᵀ."""
        a = self.A.astype(jnp.float32)
        b = self.B.astype(jnp.float32)
        r = a.shape[-1]
        gram_a = jnp.einsum("...ir,...is->...rs", a, a)
        gram_b = jnp.einsum("...ro,...so->...rs", b, b)
        eye = jnp.eye(r, dtype=jnp.float32).reshape((1,) * (gram_a.ndim - 2) + (r, r))
        l2 = jnp.sum(jnp.square(self.diag.astype(jnp.float32)))
        l3 = jnp.linalg.norm(gram_b - eye, axis=(-2, -1)) + jnp.linalg.norm(gram_a - eye, axis=(-2, -1))
        return self.beta * l2 + self.gamma * jnp.sum(l3)


def init(cfg: KasaConfig, kernel_IxO: Array, key: Array) -> KasaAdapter:
    """peft's init (A kaiming-uniform, B = 0, Δ ~ N(0, 1)) and the truncation's dropped part as the offset."""
    n_in, n_out = kernel_IxO.shape
    r = cfg.rank
    key_a, key_d = jax.random.split(key)
    m = cfg.n_dropped(n_in, n_out)
    res_a = res_b = None
    if m > 0:
        u, s, vt = svd_torch_layout(kernel_IxO)
        keep = s.shape[0] - m
        res_a = vt[keep:].T  # V_d [in, m]
        res_b = (u[:, keep:] * s[None, keep:]).T  # (U_d S_d)ᵀ [m, out]
    return KasaAdapter(
        A=kaiming_uniform(key_a, n_in, (n_in, r)),
        B=jnp.zeros((r, n_out), jnp.float32),
        diag=jax.random.normal(key_d, (r,), jnp.float32),
        res_A=res_a,
        res_B=res_b,
        scale=cfg.scale,
        dropout=cfg.dropout,
        beta=cfg.beta,
        gamma=cfg.gamma,
        compute_dtype=cfg.compute_dtype,
    )


def regularizer(tree: Any) -> Array:
    """Sum of ``node.regularizer()`` over every adapter node in `tree` that defines one (today: KaSA).

    Add it to the task loss inside the loss_fn given to ``jgoat.train_step`` (it is a plain differentiable function
    of the params; it is deliberately NOT the `aux` output, which train_step multiplies by ``aux_coeff``). Returns
    0.0 for trees without such nodes, so a loss_fn can always add it.

    Args:
      tree: the full wrapped params (``jgoat.combine(trainable, frozen)``) or its trainable half.

    Returns:
      A float32 scalar.

    Example:
      >>> total = task_loss + jgoat.regularizer(params)
    """
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: callable(getattr(x, "regularizer", None)))
    total = jnp.zeros((), jnp.float32)
    for node in nodes:
        if callable(getattr(node, "regularizer", None)):
            total = total + node.regularizer()
    return total
