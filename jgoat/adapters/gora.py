"""GoRA (He et al., NeurIPS 2025, "Gradient-driven Adaptive Low Rank Adaptation"; official code: MyTransformers
``common/lora_modules/gora.py``): per-layer ranks and a B init derived from the base model's accumulated gradient.

Pipeline (Flax layout: kernel W [in, out], A [in, r], B [r, out]); this module holds the per-layer config, node,
init and rank rule, :mod:`jgoat.grad_init` the steps that need a loss or the whole tree (``jgoat.gora_*``):

  1. ``gora_gradients``: Ḡ_l = (1/N) Σ_batches ∂loss/∂W_l, differentiating ONLY the targeted kernels (every other
     weight is a constant of the differentiated function), accumulated in fp32 inside one jitted, donating step.
  2. ``gora_importance`` / ``gora_allocate``: I_l = mean(|W_l ⊙ Ḡ_l|) per layer — every layer of a scanned stack is
     its own l — a_l = I_l / Σ I, budget b = Σ_l (m_l + n_l)·r_ref and
     r_l = min(clamp(round(b·a_l) // (m_l + n_l), r_min, r_max), min(m_l, n_l)).
     Rounding: Python's ``round`` (round half to EVEN: 2.5 → 2, 3.5 → 4) on the float64 product b·(I_l/ΣI), exactly
     the official default (``gora_allocate_stretagy='moderate'`` → ``round``), then integer floor division. Two
     documented deviations: a_l is computed in float64 with an exactly rounded sum (math.fsum; the official code
     normalises in float32), and ranks are capped at min(in, out) (the official code is not; a rank above it adds no
     expressiveness: A Aᵀ would be singular).
  3. ``gora_wrap``: per layer, A_l ~ U(±1/√in) (kaiming-uniform a=√5, as LoRA; drawn as [in, r_pad] and its first
     r_l columns kept, so one compile serves every rank of a module) and
        B_l = c_l · pinv(A_lᵀA_l + 1e-8·I) · A_lᵀ · Ḡ_l,   c_l = σ · lr_init · √(in/r_l) / s_l,
     the Flax transpose of the official B = Ḡ_t A_tᵀ pinv(A_t A_tᵀ + 1e-8·I) (torch layout Ḡ_t = Ḡᵀ, A_t = Aᵀ). Then
        s_l · A_l B_l = σ · lr_init · √(in/r_l) · P_l Ḡ_l,   P_l = A_l (A_lᵀA_l)⁻¹ A_lᵀ,
     i.e. the gradient projected onto A's span (the row space of peft's lora_A): one gradient-descent step restricted
     to the subspace the adapter can express. The factor √(in/r_l) is the official ``gora_scale_by_lr`` rule: a random
     rank-r projection keeps about r/in of a gradient's squared norm, so ‖s·AB‖_F ≈ lr_init·‖Ḡ‖_F. σ = −1 for
     ``sign="descend"`` (the paper); σ = +1 for ``sign="code"`` (the official code's ``+grad_stored``, which ASCENDS
     the loss at init). The base is never modified; s = alpha / d (d = r_l with ``dynamic_scaling``, else r_ref;
     √d with ``use_rslora``). The init product does not depend on s (c_l divides it out); s shapes training.

Static shapes vs per-layer ranks. A scanned stack holds one array per field for all its layers, so layers with
different ranks cannot have different shapes. jgoat stores such a stack PADDED to the stack's largest rank r_pad, with
the true rank of every layer in a frozen int32 leaf ``rank`` (and its scaling in a frozen float32 leaf ``scale``):
the forward and the merge use A ⊙ [j < rank] (columns j ≥ rank zeroed), so padded columns of A and rows of B get an
exactly-zero gradient and, being initialised to 0, stay 0 under Adam/AdamW (zero moments, zero decoupled decay) and
clipping. The padding costs (r_pad − r_l)·(in + out) idle parameters per layer; an unstacked module, or a stack
whose layers share one rank, has no padding. Rejecting stacks with unequal ranks instead would make GoRA unusable on
scanned models (every jgoat decoder), and forcing one rank per stack would drop the per-layer allocation GoRA is about.

The ranks live inside the adapter (the ``rank`` leaves, saved by ``jgoat.save``); to reload, rebuild the template
with the same shapes without any gradient: ``gora_wrap(base, cfg, key=key, ranks=gora_ranks(checkpoint_dir))``.
A GoRA layer is a LoRA layer (same forward, exact merge). It is not stored as a ``LoraAdapter`` because that node's
scale is one static number per module (shared by a whole stack) while GoRA's s_l depends on each layer's rank, and
because a padded stack needs the rank mask; ``GoraAdapter`` is LoRA plus exactly those two frozen leaves.
``jgoat.export_peft(tree, cfg, ...)`` writes it as a peft LoRA: each layer's unpadded slices, its rank in
``rank_pattern`` and ``GoraConfig.peft_alpha(r_l)`` in ``alpha_pattern`` (peft's α'/r_l or α'/√r_l is then s_l);
``jgoat.import_peft`` onto a ``gora_wrap(..., ranks=...)`` template reads it back into GoRA layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
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
)

PyTree = Any
GORA_SIGNS = ("descend", "code")
_GRAM_EPS = 1e-8  # the official code's pinv(A Aᵀ + 1e-8·I)
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class GoraConfig(AdapterConfig):
    """GoRA: gradient-driven per-layer ranks and init (defaults: the official Llama scripts).

    Attributes:
      r_ref: the reference rank defining the budget b = Σ_l (in_l + out_l)·r_ref (the scripts' ``--lora-rank 8``).
      r_min, r_max: bounds of every layer's rank (scripts: 4 and 32); ranks are also capped at min(in, out).
      alpha: scaling numerator (``--lora-scaler 16``).
      lr_init: the step size of the gradient step the init encodes (``--gora-lr 5e-2``).
      sign: "descend" (paper: s·AB ∝ −Ḡ, lowers the loss) or "code" (the official code: +Ḡ).
      dynamic_scaling: s uses the layer's own rank r_l (``--gora-dynamic-scaling``), else r_ref.
      use_rslora: s = alpha / √d instead of alpha / d (``--gora-rank-stablize``).

    Example:
      >>> cfg = jgoat.GoraConfig(targets="all-linear")
      >>> grads = jgoat.gora_gradients(params, loss_fn, batches[:32], targets=cfg)
      >>> wrapped = jgoat.gora_wrap(params, cfg, grads, key=key)
    """

    r_ref: int = 8
    r_min: int = 4
    r_max: int = 32
    alpha: float = 16.0
    lr_init: float = 5e-2
    sign: str = "descend"
    dynamic_scaling: bool = True
    use_rslora: bool = True

    method: ClassVar[str] = "gora"

    def __post_init__(self):
        super().__post_init__()  # r_ref, r_min, r_max positive ints, alpha and lr_init finite
        if self.r_min > self.r_max:
            raise ValueError(f"r_min ({self.r_min}) > r_max ({self.r_max}): the rank bounds are empty")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not self.lr_init > 0:
            raise ValueError(f"lr_init must be a finite number > 0, got {self.lr_init}")
        if self.sign not in GORA_SIGNS:
            raise ValueError(f"unknown sign {self.sign!r}; allowed: 'descend' (the paper: the init descends along "
                             "−Ḡ) or 'code' (the official code's +Ḡ)")

    def scale_for(self, rank: int) -> float:
        """s_l for a layer of rank r_l: alpha / d, d = r_l (dynamic_scaling) or r_ref, √d with use_rslora."""
        d = rank if self.dynamic_scaling else self.r_ref
        return self.alpha / (math.sqrt(d) if self.use_rslora else d)

    def peft_alpha(self, rank: int) -> float:
        """The lora_alpha with which peft's scaling (alpha/r, or alpha/√r with use_rslora) of a rank-r layer is s_l."""
        if self.dynamic_scaling:
            return self.alpha
        ratio = rank / self.r_ref
        return self.alpha * (math.sqrt(ratio) if self.use_rslora else ratio)

    def init_coef(self, rank: int, in_features: int) -> float:
        """c_l with s_l·A·B = σ·lr_init·√(in/r_l)·P_A·Ḡ: B = c_l · pinv(AᵀA) Aᵀ Ḡ."""
        sigma = -1.0 if self.sign == "descend" else 1.0
        return sigma * self.lr_init * math.sqrt(in_features / rank) / self.scale_for(rank)


@struct.dataclass
class GoraAdapter(AdditiveMerge):
    """One GoRA layer: a LoRA layer whose rank is a frozen leaf.

    A [in, r_pad], B [r_pad, out] (trained); rank int32 [] (r_l ≤ r_pad, frozen): columns j ≥ rank of A are masked
    out, so only the first r_l rank-1 terms exist; scale float32 [] (s_l, frozen). y = x W + b + s·(x A_r) B.
    """

    A: Array
    B: Array
    rank: Array
    scale: Array
    dropout: float = struct.field(pytree_node=False, default=0.0)
    compute_dtype: str = struct.field(pytree_node=False, default="auto")

    trainable: ClassVar[tuple[str, ...]] = ("A", "B")
    layer_ndim: ClassVar[int] = 2  # ndim of A for one unstacked layer

    @property
    def in_features(self) -> int:
        return self.A.shape[-2]

    def masked_A(self) -> Array:
        """A with its padded columns (index ≥ rank) exactly zero; no gradient reaches them."""
        keep_1xR = (jnp.arange(self.A.shape[-1]) < self.rank)[None, :]
        return jnp.where(keep_1xR, self.A, jnp.zeros((), self.A.dtype))

    def delta_weight(self) -> Array:
        return self.scale * jnp.matmul(self.masked_A(), self.B, precision=_HI)

    def forward(self, x_TxI: Array, y_TxO: Array, ctx: Context) -> tuple[Array, None]:
        dtype = compute_dtype(self, x_TxI)
        x_drop = dropout(x_TxI.astype(dtype), self.dropout, ctx.rng)
        delta = self.scale * low_rank(x_drop, self.masked_A(), self.B, dtype)
        return y_TxO + delta.astype(y_TxO.dtype), None


# --------------------------------------------------------------------------------------------------- per-layer init


def _layer_factors(grad_IxO: Array | None, key: Array, rank: Array, coef: Array, *, n_in: int, n_out: int,
                   r_pad: int) -> tuple[Array, Array]:
    """A [in, r_pad], B [r_pad, out] of one layer; rank is traced, so one compile serves every rank ≤ r_pad.

    A = a kaiming draw of shape [in, r_pad] with the columns ≥ rank zeroed. The Gram matrix gets 1e-8 on its live
    diagonal (the official regulariser) and 1 on its padded diagonal, so it is block-diagonal [AᵣᵀAᵣ + 1e-8·I, I]:
    the live block of B is exactly the rank-r formula and the padded rows (Aᵀ Ḡ = 0 there) are forced to 0.
    """
    keep_R = jnp.arange(r_pad) < rank
    a = jnp.where(keep_R[None, :], kaiming_uniform(key, n_in, (n_in, r_pad)), 0.0)
    if grad_IxO is None:
        return a, jnp.zeros((r_pad, n_out), jnp.float32)
    gram = jnp.matmul(a.T, a, precision=_HI) + jnp.diag(jnp.where(keep_R, _GRAM_EPS, 1.0))
    a_t_g = jnp.matmul(a.T, grad_IxO.astype(jnp.float32), precision=_HI)
    b = coef * jnp.matmul(jnp.linalg.pinv(gram), a_t_g, precision=_HI)
    return a, jnp.where(keep_R[:, None], b, 0.0)


@functools.partial(jax.jit, static_argnames=("n_in", "n_out", "r_pad"))
def _stack_factors(grads_NxIxO: Array | None, keys_N: Array, ranks_N: Array, coefs_N: Array, *, n_in: int,
                   n_out: int, r_pad: int) -> tuple[Array, Array]:
    """_layer_factors over N layers (one compile per module shape); grads None: the template (B = 0)."""
    fn = functools.partial(_layer_factors, n_in=n_in, n_out=n_out, r_pad=r_pad)
    if grads_NxIxO is None:
        return jax.vmap(lambda k, r, c: fn(None, k, r, c))(keys_N, ranks_N, coefs_N)
    return jax.vmap(fn)(grads_NxIxO, keys_N, ranks_N, coefs_N)


def stacked_nodes(cfg: GoraConfig, grads_NxIxO: Array | None, keys_N: Array, ranks: Sequence[int], n_in: int,
                  n_out: int, r_pad: int) -> GoraAdapter:
    """The adapters of N layers stacked along a leading axis [N, ...]: per-layer `ranks`, B = 0 without grads."""
    coefs = np.asarray([cfg.init_coef(r, n_in) for r in ranks], np.float32)
    scales = np.asarray([cfg.scale_for(r) for r in ranks], np.float32)
    ranks_N = np.asarray(ranks, np.int32)
    a, b = _stack_factors(grads_NxIxO, keys_N, ranks_N, coefs, n_in=n_in, n_out=n_out, r_pad=r_pad)
    return GoraAdapter(A=a, B=b, rank=jnp.asarray(ranks_N), scale=jnp.asarray(scales), dropout=cfg.dropout,
                       compute_dtype=cfg.compute_dtype)


def init(cfg: GoraConfig, kernel_IxO: Array, key: Array, *, grad_IxO: Array | None, rank: int,
         r_pad: int | None = None) -> GoraAdapter:
    """One unstacked layer. grad_IxO: Ḡ [in, out] (None: B = 0, a shape template for ``jgoat.restore``)."""
    n_in, n_out = kernel_IxO.shape
    r_pad = rank if r_pad is None else r_pad
    if not 1 <= rank <= min(r_pad, n_in, n_out):
        raise ValueError(f"rank {rank} must be in [1, min(r_pad={r_pad}, in={n_in}, out={n_out})]")
    if grad_IxO is not None and tuple(grad_IxO.shape) != (n_in, n_out):
        raise ValueError(f"gradient shape {tuple(grad_IxO.shape)} != kernel shape {(n_in, n_out)}")
    node = stacked_nodes(cfg, None if grad_IxO is None else grad_IxO[None], key[None], [rank], n_in, n_out, r_pad)
    return jax.tree.map(lambda x: x[0], node)


# --------------------------------------------------------------------------------------------------- ranks


def allocate_ranks(importance: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]],
                   cfg: GoraConfig) -> dict[str, np.ndarray]:
    """GoRA's rank rule on host numbers (pure; see the module docstring for the rounding rule).

    Args:
      importance: {path: I [*stack]} (e.g. from ``gora_importance``), every entry ≥ 0, not all 0.
      shapes: {path: (in_features, out_features)} of one layer.
      cfg: r_ref, r_min, r_max.

    Returns:
      {path: int64 ranks [*stack]}: r_l = min(clamp(round(b·(I_l/ΣI)) // (m_l+n_l), r_min, r_max), min(m_l, n_l)).
    """
    imps = {name: np.asarray(v, np.float64) for name, v in importance.items()}
    if set(shapes) != set(imps):
        raise ValueError(f"importance and shapes name different modules: {sorted(set(shapes) ^ set(imps))[:4]}")
    flat = [float(x) for v in imps.values() for x in v.reshape(-1)]
    if not all(math.isfinite(x) and x >= 0 for x in flat):
        raise ValueError("importances must be finite and ≥ 0 (non-finite gradients? check the loss)")
    total = math.fsum(flat)
    if total <= 0:
        raise ValueError("every importance is 0: the accumulated gradients of the targeted kernels are all zero")
    budget = cfg.r_ref * sum((shapes[n][0] + shapes[n][1]) * v.size for n, v in imps.items())
    out = {}
    for name, v in imps.items():
        n_in, n_out = shapes[name]
        features = n_in + n_out
        ranks = [min(max(round(budget * (x / total)) // features, cfg.r_min), cfg.r_max, n_in, n_out)
                 for x in v.reshape(-1).tolist()]
        out[name] = np.asarray(ranks, np.int64).reshape(v.shape)
    return out


__all__: Sequence[str] = [
    "GoraAdapter",
    "GoraConfig",
    "allocate_ranks",
    "init",
    "stacked_nodes",
]
