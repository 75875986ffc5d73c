"""GOAT (Fan et al., ICML 2025): LoRA mixture-of-experts with SVD-segment init and theory-derived scaling.

The exact math is ../shared/spec/GOAT.md; section numbers below refer to it. Defaults reproduce the official code.
MoLoRA is the same layer with init="zero" (A kaiming, B = 0, base unchanged) and scaling="alpha".

Layout (one layer, Flax): A [E, in, d], B [E, d, out], router [in, E]; the frozen residual correction
W_res = init_cof · s · Σ_i A_i B_i is held as the low-rank offset res_A [in, E·d], res_B [E·d, out].

Dtype policy (``compute_dtype``): the expert and offset matmuls take their operands in the compute dtype with float32
accumulation; the router logits, softmax, top-k, renormalisation, the gating of the expert outputs and the aux loss
are always float32. Under a lower compute dtype the logits stay float32-accurate without a float32 copy of the
activations: the float32 router weight is split into three compute-dtype parts, W = hi + mid + lo exactly (8 + 8 + 8
significand bits of bf16 cover float32's 24), so each product x_i·part is exact in float32 and the float32
accumulation of the 3·in products has the error of a float32 dot (``router_logits``). Routing decisions therefore
never depend on a bf16 rounding of the router weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jgoat.adapters.base import (
    AdapterConfig,
    Array,
    Context,
    compute_dtype,
    dropout,
    einsum,
    kaiming_uniform,
    svd_torch_layout,
)
from jgoat.adapters.lora import offset

GOAT_INITS = ("goat", "goat_mini", "pissa", "milora", "zero")
SCALINGS = ("theory", "alpha")
AUX_FORMS = ("code", "paper")
DROPOUT_MODES = ("per_expert", "shared")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GoatConfig(AdapterConfig):
    """GOAT knobs (GOAT.md §1–4).

    Attributes:
      rank: total rank r over all experts; each expert gets d = r // experts.
      experts: E, number of LoRA experts.
      top_k: k experts per token.
      init: "goat" (expert i takes the first d triplets of SVD block i), "goat_mini" (the last d of each block),
        "pissa" (top r in order), "milora" (bottom r), "zero" (MoLoRA: A kaiming, B = 0, no residual).
      scaling: "theory" (s = sqrt(3·eta·in / d), per layer) or "alpha" (s = alpha / d).
      alpha: lora_alpha for scaling="alpha".
      eta: ratio of full-FT lr to LoRA lr in the theory scaling.
      rho: init damping: s·B_i A_i = U_i Σ_i V_iᵀ / rho.
      init_cof: residual coefficient; W_res = init_cof · s · Σ_i A_i B_i. None means 1 / experts (the theorem).
      aux_form: "code" (E · Σ f_i P_i, the official code) or "paper" ((E/k) · Σ f_i P_i).
      dropout_mode: "per_expert" (an independent mask per expert, as the official code; materialises [T, E, in])
        or "shared" (one mask for all experts; cheaper, different noise correlation).
    """

    rank: int = 32
    experts: int = 8
    top_k: int = 2
    init: str = "goat"
    scaling: str = "theory"
    alpha: float = 16.0
    eta: float = 1.0
    rho: float = 10.0
    init_cof: float | None = None
    aux_form: str = "code"
    dropout_mode: str = "per_expert"

    method: ClassVar[str] = "goat"

    def __post_init__(self):
        super().__post_init__()  # rank, experts, top_k positive ints; alpha, eta, rho, init_cof finite
        if self.rank % self.experts:
            raise ValueError(
                f"rank {self.rank} is not divisible by experts {self.experts}: each expert needs rank "
                f"rank // experts; use a rank that is a multiple of {self.experts}"
            )
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} > experts {self.experts}; top_k must be in [1, experts]")
        for name, allowed in (("init", GOAT_INITS), ("scaling", SCALINGS), ("aux_form", AUX_FORMS),
                              ("dropout_mode", DROPOUT_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        for name in ("alpha", "eta", "rho"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.init_cof is not None and self.init_cof < 0:
            raise ValueError(f"init_cof must be >= 0 or None (= 1/experts), got {self.init_cof}")

    @property
    def reads_base(self) -> bool:
        return self.init != "zero"  # the SVD inits

    @property
    def expert_rank(self) -> int:
        return self.rank // self.experts

    @property
    def residual_coefficient(self) -> float:
        return 1.0 / self.experts if self.init_cof is None else self.init_cof

    def scale(self, in_features: int) -> float:
        """GOAT.md §2: the per-layer scaling s."""
        if self.scaling == "theory":
            return math.sqrt(3.0 * self.eta * in_features / self.expert_rank)
        return self.alpha / self.expert_rank

    def check_layer(self, path: str, in_features: int, out_features: int) -> None:
        h = min(in_features, out_features)
        if self.rank > h:
            raise ValueError(
                f"rank {self.rank} > min(in, out) = {h} for layer '{path}' [{in_features} -> {out_features}]; "
                "lower the rank or exclude this layer (the official code skips such layers silently)"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoLoraConfig(GoatConfig):
    """MoLoRA: GOAT's router, top-k and aux loss with plain LoRA experts (A kaiming, B = 0), s = alpha / d."""

    init: str = "zero"
    scaling: str = "alpha"


@struct.dataclass
class GoatAdapter:
    """One GOAT layer (see the module docstring for shapes)."""

    A: Array
    B: Array
    router: Array
    res_A: Array | None = None
    res_B: Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    top_k: int = struct.field(pytree_node=False, default=2)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    dropout_mode: str = struct.field(pytree_node=False, default="per_expert")
    aux_form: str = struct.field(pytree_node=False, default="code")
    compute_dtype: str = struct.field(pytree_node=False, default="auto")

    trainable: ClassVar[tuple[str, ...]] = ("A", "B", "router")
    layer_ndim: ClassVar[int] = 3  # ndim of A for one unstacked layer

    @property
    def in_features(self) -> int:
        return self.A.shape[-2]

    def router_parts(self, dtype) -> Array:
        """[hi | mid | lo] [in, 3E] in `dtype`, hi + mid + lo = router exactly (module docstring)."""
        hi = self.router.astype(dtype)
        mid = (self.router - hi.astype(jnp.float32)).astype(dtype)
        lo = (self.router - hi.astype(jnp.float32) - mid.astype(jnp.float32)).astype(dtype)
        return jnp.concatenate([hi, mid, lo], axis=-1)

    def router_logits(self, x_TxI: Array) -> Array:
        """x @ router [T, E] in float32. float32 compute dtype: the float32 product. A lower one: x in that dtype
        (exact for activations already in it) times the three-part split of the router (module docstring)."""
        dtype = compute_dtype(self, x_TxI)
        if dtype == jnp.float32:
            return x_TxI.astype(jnp.float32) @ self.router
        return _sum_parts(einsum("ti,ie->te", x_TxI, self.router_parts(dtype), dtype))

    def route(self, x_TxI: Array) -> tuple[Array, Array, Array]:
        """GOAT.md §3: probabilities p [T, E], dense gates [T, E] (k non-zeros summing to 1), top-k idx [T, k]; all
        float32 whatever the compute dtype."""
        return self.route_from_logits(self.router_logits(x_TxI))

    def route_from_logits(self, logits_TxE: Array) -> tuple[Array, Array, Array]:
        """`route` from float32 router logits."""
        p_TxE = jax.nn.softmax(logits_TxE, axis=-1)
        w_TxK, idx_TxK = jax.lax.top_k(p_TxE, self.top_k)
        w_TxK = w_TxK / jnp.sum(w_TxK, axis=-1, keepdims=True)
        n_experts = self.router.shape[-1]
        gates_TxE = jnp.sum(jax.nn.one_hot(idx_TxK, n_experts, dtype=jnp.float32) * w_TxK[..., None], axis=1)
        return p_TxE, gates_TxE, idx_TxK

    def aux_loss(self, p_TxE: Array, idx_TxK: Array, token_mask_T: Array | None) -> Array:
        """GOAT.md §4: E · Σ_i f_i P_i (code form) or that divided by k (paper form), over (unmasked) tokens."""
        n_experts = p_TxE.shape[-1]
        slots_TxE = jnp.sum(jax.nn.one_hot(idx_TxK, n_experts, dtype=jnp.float32), axis=1)
        if token_mask_T is None:
            f_E, p_E = jnp.mean(slots_TxE, axis=0), jnp.mean(p_TxE, axis=0)
        else:
            m_T = token_mask_T.astype(jnp.float32)
            count = jnp.maximum(jnp.sum(m_T), 1.0)
            f_E = jnp.sum(slots_TxE * m_T[:, None], axis=0) / count
            p_E = jnp.sum(p_TxE * m_T[:, None], axis=0) / count
        loss = n_experts * jnp.sum(f_E * p_E)
        return loss / self.top_k if self.aux_form == "paper" else loss

    def expert_inputs(self, x_TxI: Array, rng: Array | None) -> Array:
        """x @ A_i for every expert, [T, E, d] float32, with adapter dropout on the expert input; x's dtype is the
        compute dtype (A is cast to it, the products accumulate in float32)."""
        dtype = x_TxI.dtype
        if self.dropout == 0.0 or rng is None or self.dropout_mode == "shared":
            return einsum("ti,eid->ted", dropout(x_TxI, self.dropout, rng), self.A, dtype)
        n_experts = self.A.shape[0]
        x_TxExI = jnp.broadcast_to(x_TxI[:, None, :], (x_TxI.shape[0], n_experts, x_TxI.shape[1]))
        return einsum("tei,eid->ted", dropout(x_TxExI, self.dropout, rng), self.A, dtype)

    def forward(self, x_TxI: Array, y_TxO: Array, ctx: Context) -> tuple[Array, Array]:
        dtype = compute_dtype(self, x_TxI)
        if dtype != jnp.float32 and (self.dropout == 0.0 or ctx.rng is None):
            return self.fused_forward(x_TxI, y_TxO, ctx, dtype)
        x = x_TxI.astype(dtype)
        p_TxE, gates_TxE, idx_TxK = self.route(x_TxI)
        h_TxExD = self.expert_inputs(x, ctx.rng) * (self.scale * gates_TxE)[..., None]
        delta_TxO = einsum("ted,edo->to", h_TxExD, self.B, dtype) - offset(self, x, dtype)
        return y_TxO + delta_TxO.astype(y_TxO.dtype), self.aux_loss(p_TxE, idx_TxK, ctx.token_mask_T)


    def fused_forward(self, x_TxI: Array, y_TxO: Array, ctx: Context, dtype) -> tuple[Array, Array]:
        """`forward` below float32 when the expert input is not dropped: the three contractions of x (router parts,
        experts' A, the offset's res_A) are one matmul x @ [parts | A | res_A], and the two of the gated expert
        inputs and the offset's (B, res_B) one more, [s·g·(x A) | −x res_A] @ [B; res_B]. Column for column the same
        sums as the separate contractions (in another accumulation order); one read of x and, in the backward pass,
        one float32 accumulation of x's gradient instead of three."""
        n_experts, n_in, d = self.A.shape
        n_tokens = x_TxI.shape[0]
        a_IxC = jnp.transpose(self.A, (1, 0, 2)).reshape(n_in, n_experts * d)
        weights = [self.router_parts(dtype), a_IxC.astype(dtype)]
        if self.res_A is not None:
            weights.append(self.res_A.astype(dtype))
        z_TxC = einsum("ti,ic->tc", x_TxI, jnp.concatenate(weights, axis=-1), dtype)
        p_TxE, gates_TxE, idx_TxK = self.route_from_logits(_sum_parts(z_TxC[:, : 3 * n_experts]))
        h_TxExD = z_TxC[:, 3 * n_experts : 3 * n_experts + n_experts * d].reshape(n_tokens, n_experts, d)
        inputs = [(h_TxExD * (self.scale * gates_TxE)[..., None]).reshape(n_tokens, n_experts * d)]
        outputs = [self.B.reshape(n_experts * d, -1)]
        if self.res_A is not None:
            inputs.append(-z_TxC[:, 3 * n_experts + n_experts * d :])
            outputs.append(self.res_B)
        delta_TxO = einsum("tc,co->to", jnp.concatenate(inputs, axis=-1), jnp.concatenate(outputs, axis=0), dtype)
        return y_TxO + delta_TxO.astype(y_TxO.dtype), self.aux_loss(p_TxE, idx_TxK, ctx.token_mask_T)


def _sum_parts(logits_Tx3E: Array) -> Array:
    """The router logits [T, E] from the products with its three parts [T, 3E] (float32)."""
    return jnp.sum(logits_Tx3E.reshape(logits_Tx3E.shape[0], 3, -1), axis=1)


def segment_indices(cfg: GoatConfig, h: int) -> Array:
    """GOAT.md §1.2: which singular triplets (of h) each expert takes, [E, d]."""
    n_experts, d, r = cfg.experts, cfg.expert_rank, cfg.rank
    block = h // n_experts
    starts = {
        "goat": [i * block for i in range(n_experts)],
        "goat_mini": [(i + 1) * block - d for i in range(n_experts)],
        "pissa": [i * d for i in range(n_experts)],
        "milora": [h - r + i * d for i in range(n_experts)],
    }[cfg.init]
    return jnp.asarray(starts)[:, None] + jnp.arange(d)[None, :]


def init(cfg: GoatConfig, kernel_IxO: Array, key: Array) -> GoatAdapter:
    """Initialise one (unstacked) GOAT layer from its frozen [in, out] kernel (GOAT.md §1)."""
    n_in, n_out = kernel_IxO.shape
    n_experts, d = cfg.experts, cfg.expert_rank
    s = cfg.scale(n_in)
    key_router, key_a = jax.random.split(key)
    router = kaiming_uniform(key_router, n_in, (n_in, n_experts))
    static = dict(scale=s, top_k=cfg.top_k, dropout=cfg.dropout, dropout_mode=cfg.dropout_mode,
                  aux_form=cfg.aux_form, compute_dtype=cfg.compute_dtype)
    if cfg.init == "zero":
        a = kaiming_uniform(key_a, n_in, (n_experts, n_in, d))
        return GoatAdapter(A=a, B=jnp.zeros((n_experts, d, n_out), jnp.float32), router=router, **static)
    u, sv, vt = svd_torch_layout(kernel_IxO)
    idx_ExD = segment_indices(cfg, sv.shape[0])
    root_ExD = jnp.sqrt(sv[idx_ExD] / (s * cfg.rho))
    a = jnp.transpose(vt[idx_ExD], (0, 2, 1)) * root_ExD[:, None, :]  # [E, in, d]
    b = jnp.transpose(u[:, idx_ExD], (1, 2, 0)) * root_ExD[:, :, None]  # [E, d, out]
    res_a = jnp.transpose(a, (1, 0, 2)).reshape(n_in, n_experts * d)
    res_b = (cfg.residual_coefficient * s) * b.reshape(n_experts * d, n_out)
    return GoatAdapter(A=a, B=b, router=router, res_A=res_a, res_B=res_b, **static)
