"""LoRI (Zhang et al., COLM 2025, "LoRA with Reduced Interference"): frozen random A, trained (sparse) B.

  * LoRI-D: A [in, r] is a frozen random projection (kaiming-uniform, stored WITH the adapter so checkpoints and
    merges reproduce it), B = 0 is trained dense; y = x W + b + s · (dropout(x) A) B, s = alpha / r.
  * ``lori_masks(tree, sparsity)``: one global magnitude mask over ALL adapted layers — concatenate |B| of every
    LoRI layer (stacked layers included), keep the entries ≥ the k-th largest, k = round((1 − sparsity) · N)
    (ties at the threshold are kept, so slightly more than k may survive).
  * LoRI-S: ``lori_sparse(tree, masks)`` restarts B = 0 with the SAME A and stores the mask as a frozen field; the
    forward uses where(mask, B, 0). Masked entries therefore get an exactly-zero gradient; with B = 0 there, Adam's
    moments stay 0 (update 0 / (√0 + eps) = 0) and AdamW's decoupled decay (−lr·wd·B) is 0 too, so masked entries
    stay exactly 0 under ``jgoat.adamw_cosine`` (any weight decay) and gradient clipping. Even if an optimizer moved
    them, they would not affect the forward or the merge. The paper trains LoRI-S with 10× LoRI-D's learning rate.
  * ``lori_concat(trees, weights)``: multi-task merging by concatenation along the rank axis; the result is a plain
    ``LoraAdapter`` of rank Σ rᵢ with ΔW = Σ wᵢ · ΔWᵢ (exact up to fp32 rounding; bit-exact blocks when wᵢ = 1 and the
    scalings agree).
"""

from __future__ import annotations

import dataclasses
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
from jgoat.adapters.lora import LoraAdapter
from jgoat.core import ADAPTER_KEY, fingerprint, iter_modules, path_str, replace_at

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoriConfig(AdapterConfig):
    """LoRI (paper defaults: r = 32, alpha = 64, dropout 0, sparsity 0.9).

    Attributes:
      rank: r (> 0, <= min(in, out)).
      alpha: s = alpha / rank.
      sparsity: fraction of B entries the LoRI-S mask removes, in [0, 1); pass it to ``jgoat.lori_masks``.

    Example:
      >>> cfg = jgoat.LoriConfig(rank=32, alpha=64, targets="all-linear")
      >>> dense = train(jgoat.wrap(params, cfg, key=key))                 # LoRI-D
      >>> sparse = jgoat.lori_sparse(dense, jgoat.lori_masks(dense, cfg.sparsity))
      >>> final = train(sparse, lr=10 * lr)                                 # LoRI-S
    """

    rank: int = 32
    alpha: float = 64.0
    sparsity: float = 0.9

    method: ClassVar[str] = "lori"

    def __post_init__(self):
        super().__post_init__()  # rank a positive int, the floats finite
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        _check_sparsity(self.sparsity)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check_layer(self, path: str, in_features: int, out_features: int) -> None:
        if self.rank > min(in_features, out_features):
            raise ValueError(
                f"rank {self.rank} > min(in, out) = {min(in_features, out_features)} for layer '{path}' "
                f"[{in_features} -> {out_features}]; lower the rank or exclude this layer"
            )


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


@struct.dataclass
class LoriAdapter(AdditiveMerge):
    """One LoRI layer: A [in, r] frozen, B [r, out] trained, mask [r, out] bool (LoRI-S, frozen) or None (LoRI-D)."""

    A: Array
    B: Array
    mask: Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    compute_dtype: str = struct.field(pytree_node=False, default="auto")

    trainable: ClassVar[tuple[str, ...]] = ("B",)
    layer_ndim: ClassVar[int] = 2  # ndim of A for one unstacked layer

    @property
    def in_features(self) -> int:
        return self.A.shape[-2]

    def effective_B(self) -> Array:
        """B with the LoRI-S mask applied (masked entries exactly 0, and no gradient flows to them)."""
        if self.mask is None:
            return self.B
        return jnp.where(self.mask, self.B, jnp.zeros((), self.B.dtype))

    def delta_weight(self) -> Array:
        return self.scale * (self.A @ self.effective_B())

    def forward(self, x_TxI: Array, y_TxO: Array, ctx: Context) -> tuple[Array, None]:
        dtype = compute_dtype(self, x_TxI)
        x_drop = dropout(x_TxI.astype(dtype), self.dropout, ctx.rng)
        delta = self.scale * low_rank(x_drop, self.A, self.effective_B(), dtype)
        return y_TxO + delta.astype(y_TxO.dtype), None


def init(cfg: LoriConfig, kernel_IxO: Array, key: Array) -> LoriAdapter:
    """LoRI-D: A ~ U(±1/√in) (torch's kaiming_uniform_(a=√5), frozen), B = 0."""
    n_in, n_out = kernel_IxO.shape
    return LoriAdapter(A=kaiming_uniform(key, n_in, (n_in, cfg.rank)), B=jnp.zeros((cfg.rank, n_out), jnp.float32),
                       scale=cfg.scale, dropout=cfg.dropout, compute_dtype=cfg.compute_dtype)


def _lori_nodes(tree: PyTree) -> list[tuple[tuple[str, ...], LoriAdapter]]:
    return [(p, m[ADAPTER_KEY]) for p, m in iter_modules(tree) if isinstance(m.get(ADAPTER_KEY), LoriAdapter)]


def lori_masks(tree: PyTree, sparsity: float) -> dict[str, Array]:
    """The global LoRI-S magnitude mask of a trained LoRI-D tree.

    |B| of every LoRI layer (all stacked layers too) is ranked together; the top k = round((1 − sparsity) · N)
    entries (at least 1) are kept, plus every entry tied with the k-th largest.

    Args:
      tree: a wrapped tree holding LoRI adapters (LoRI-D after training; a LoRI-S tree uses its masked B).
      sparsity: the fraction to remove, in [0, 1) (the paper: 0.9).

    Returns:
      {module path: bool mask with B's shape [*L, r, out]}.

    Example:
      >>> masks = jgoat.lori_masks(trained, 0.9)
    """
    _check_sparsity(sparsity)
    nodes = _lori_nodes(tree)
    if not nodes:
        raise ValueError("the tree holds no LoRI adapter: wrap it with jgoat.LoriConfig first")
    mags = [jnp.abs(node.effective_B()).astype(jnp.float32) for _, node in nodes]
    flat = jnp.concatenate([m.reshape(-1) for m in mags])
    n = int(flat.shape[0])
    if not bool(jnp.any(flat > 0)):
        raise ValueError("every LoRI B is zero: compute the masks from a TRAINED LoRI-D tree")
    k = min(max(int(round((1.0 - sparsity) * n)), 1), n)
    threshold = jax.lax.top_k(flat, k)[0][k - 1]
    return {path_str(p): m >= threshold for (p, _), m in zip(nodes, mags, strict=True)}


def lori_sparse(tree: PyTree, masks: Mapping[str, Array]) -> dict:
    """LoRI-S: every LoRI layer restarts from B = 0 with the SAME frozen A and carries its (frozen) mask.

    Args:
      tree: a wrapped LoRI tree (usually the trained LoRI-D tree the masks came from).
      masks: {module path: bool mask of B's shape}, e.g. from ``lori_masks``; one per LoRI layer, no extras.

    Returns:
      The tree with LoRI-S adapters (train it with ~10× the LoRI-D learning rate).
    """
    nodes = _lori_nodes(tree)
    if not nodes:
        raise ValueError("the tree holds no LoRI adapter: wrap it with jgoat.LoriConfig first")
    paths = {path_str(p) for p, _ in nodes}
    missing, extra = sorted(paths - set(masks)), sorted(set(masks) - paths)
    if missing or extra:
        raise ValueError(f"masks do not match the tree's LoRI layers: missing {missing[:4]}, unknown {extra[:4]}")
    out = dict(tree)
    for p, node in nodes:
        mask = jnp.asarray(masks[path_str(p)])
        if mask.shape != node.B.shape:
            raise ValueError(f"mask for '{path_str(p)}' has shape {mask.shape}, B has {node.B.shape}")
        new = node.replace(B=jnp.zeros_like(node.B), mask=mask.astype(bool))
        out = replace_at(out, p, lambda m, a=new: {**m, ADAPTER_KEY: a})
    return out


def lori_concat(trees: Sequence[PyTree], weights: Sequence[float] | None = None) -> dict:
    """Merge LoRI adapters of several tasks by concatenating them along the rank axis.

    At every adapted module, A = [A₁ … A_n] (axis −1) and B = [c₁·B₁⊙m₁; …; c_n·B_n⊙m_n] (axis −2) with
    cᵢ = wᵢ · sᵢ / s, s = the common scaling if all agree (else 1), so ΔW = s · A B = Σ wᵢ · sᵢ · Aᵢ (Bᵢ ⊙ mᵢ).

    Args:
      trees: wrapped trees on the SAME base with LoRI adapters at the same modules (e.g. one per task).
      weights: one weight per tree (default all 1).

    Returns:
      The first tree with a ``LoraAdapter`` of rank Σ rᵢ at every LoRI module (mergeable, exportable to PEFT).
    """
    trees = list(trees)
    if not trees:
        raise ValueError("lori_concat needs at least one tree")
    weights = [1.0] * len(trees) if weights is None else [float(w) for w in weights]
    if len(weights) != len(trees):
        raise ValueError(f"got {len(weights)} weights for {len(trees)} trees")
    found = [dict((path_str(p), n) for p, n in _lori_nodes(t)) for t in trees]
    if not found[0]:
        raise ValueError("the first tree holds no LoRI adapter: wrap it with jgoat.LoriConfig first")
    for i, f in enumerate(found[1:], start=1):
        if set(f) != set(found[0]):
            diff = sorted(set(f) ^ set(found[0]))[:4]
            raise ValueError(f"tree {i} has LoRI adapters at other modules than tree 0 (differing: {diff})")
    prints = {fingerprint(t) for t in trees}
    if len(prints) > 1:
        raise ValueError("the trees were wrapped on different base weights; concatenated adapters need one base")
    out = dict(trees[0])
    for path_key, first in found[0].items():
        nodes = [f[path_key] for f in found]
        scales = {n.scale for n in nodes}
        s = first.scale if len(scales) == 1 else 1.0
        a = jnp.concatenate([n.A for n in nodes], axis=-1)
        b = jnp.concatenate([n.effective_B() if w * n.scale == s else n.effective_B() * np.float32(w * n.scale / s)
                             for n, w in zip(nodes, weights, strict=True)], axis=-2)
        merged = LoraAdapter(A=a, B=b, scale=s, dropout=first.dropout, compute_dtype=first.compute_dtype)
        out = replace_at(out, tuple(path_key.split("/")), lambda m, a=merged: {**m, ADAPTER_KEY: a})
    return out
