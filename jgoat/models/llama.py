"""Llama (2, 3.x), Mistral and Qwen2 / Qwen2.5 decoder LMs in ``flax.linen``, with KV-cache generation.

Module names mirror Hugging Face's torch modules, so parameter paths read like HF state-dict keys::

    model/embed_tokens/embedding                              <- model.embed_tokens.weight
    model/layers/self_attn/{q,k,v,o}_proj/{kernel,bias}        <- model.layers.{i}.self_attn.{q,k,v,o}_proj.*
    model/layers/mlp/{gate,up,down}_proj/kernel                <- model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model/layers/{input,post_attention}_layernorm/scale        <- model.layers.{i}.*_layernorm.weight
    model/norm/scale, lm_head/kernel                           <- model.norm.weight, lm_head.weight

With ``scan_layers=True`` (default) the layers run under ``nn.scan`` and every ``model/layers/...`` leaf has a
leading layer axis ``[L, ...]``; with ``scan_layers=False`` they are unrolled as ``model/layers_{i}/...``
(:func:`unstack_layers` / :func:`stack_layers` convert between the two). Every linear layer is a plain ``nn.Dense``
(kernel ``[in, out]``) so that adapter interceptors see it; a tied LM head (``tie_word_embeddings``) reads
``embed_tokens`` and has no parameters of its own.

Shapes in names: B batch, T query length, S key length (the sequence, or the KV cache), D hidden size,
N query heads, K key/value heads, G = N // K query heads per KV head, H head size, F intermediate size,
V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

logger = logging.getLogger(__name__)

DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2")
DECODER_TASKS = ("causal-lm",)
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
IGNORE_INDEX = -100

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
# Values HF's config classes use when a key is absent from config.json.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 4096, "max_position_embeddings": 4096 * 32},
    "qwen2": {"vocab_size": 151936, "max_position_embeddings": 32768, "qkv_bias": True},
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def _freeze(mapping: Mapping[str, Any] | Sequence | None) -> tuple[tuple[str, Any], ...] | None:
    if mapping is None:
        return None
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama / Mistral / Qwen2 decoder (field names and defaults follow HF's ``LlamaConfig``).

    Attributes:
      num_key_value_heads: KV heads for grouped-query attention (None: as many as query heads).
      head_dim: per-head size (None: ``hidden_size // num_attention_heads``; Mistral-Nemo style configs set it).
      rope_theta: RoPE base.
      rope_scaling: RoPE scaling parameters (HF ``rope_scaling`` / ``rope_parameters`` without ``rope_theta``),
        e.g. ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}``; None or type "default" is plain RoPE. Types: "default",
        "linear", "llama3"; anything else is a ValueError. Stored as a sorted tuple of items (hashable).
      qkv_bias / o_bias / mlp_bias: biases of q/k/v, o_proj and the MLP (Llama ``attention_bias`` sets q/k/v/o;
        Qwen2 has q/k/v bias only).
      tie_word_embeddings: the LM head reuses ``embed_tokens`` (Qwen2.5 small models, Llama 3.2 1B/3B).
      sliding_window: Mistral / Qwen2 sliding-window attention. Not implemented: a forward pass whose key length
        (sequence, or KV cache) exceeds the window raises (within it, the window changes nothing).
      attention_dropout: dropout on attention probabilities when ``deterministic=False``.
      dtype: compute dtype; param_dtype: dtype of freshly initialised parameters. Attention scores, softmax,
        RMSNorm statistics and RoPE angles are always computed in float32.
      scan_layers: run the layers under ``nn.scan`` (params stacked on a leading layer axis) or unrolled
        (``layers_{i}``).
      remat_policy: None (no rematerialisation) or a name in :data:`REMAT_POLICIES` ("full" recomputes the whole
        layer, "dots" saves matmul outputs, ...); applied per layer in training (not in KV-cache decoding).
      moe_experts: 0 for the dense MLP; E > 0 replaces every MLP by :class:`LlamaMoeMLP`, E SwiGLU experts with a
        top-``moe_top_k`` router (the upcycled full-FT MoE baseline of GOAT's Table 7).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    model_type: str = "llama"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat_policy: str | None = None
    moe_experts: int = 0
    moe_top_k: int = 2

    def __post_init__(self):
        if self.model_type not in DECODER_MODEL_TYPES:
            raise ValueError(
                f"Unsupported model_type {self.model_type!r}; supported: {', '.join(DECODER_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"Unknown remat_policy {self.remat_policy!r}; supported: None, {', '.join(REMAT_POLICIES)}"
            )
        if self.moe_experts < 0 or (self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts):
            raise ValueError(f"moe_experts must be >= 0 and moe_top_k in [1, moe_experts], got moe_experts="
                             f"{self.moe_experts}, moe_top_k={self.moe_top_k}")
        if self.moe_experts and self.mlp_bias:
            raise ValueError("the MoE MLP (moe_experts > 0) has no biases; set mlp_bias=False")
        object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        rope = self.rope_parameters
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            raise ValueError(
                f"Unsupported rope type {rope['rope_type']!r} (rope_scaling={rope}); supported: {', '.join(ROPE_TYPES)}"
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported (only 1.0)")
        if rope.get("rope_type") in ("linear", "llama3") and "factor" not in rope:
            raise ValueError(f"rope type {rope['rope_type']!r} needs a 'factor' in rope_scaling, got {rope}")
        if rope.get("rope_type") == "llama3":
            absent = [k for k in _LLAMA3_KEYS if k not in rope]
            if absent:
                raise ValueError(f"rope type 'llama3' needs {', '.join(absent)} in rope_scaling, got {rope}")

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """``rope_scaling`` as a dict with ``rope_type`` (HF's older ``type`` key is accepted)."""
        rope = dict(self.rope_scaling or ())
        if "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type", "default")
        return rope

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Builds a config from a HF ``config.json`` dict (Llama, Mistral or Qwen2 family).

        Reads both spellings of RoPE settings: transformers<5 (``rope_theta`` + ``rope_scaling``) and
        transformers 5 (``rope_parameters`` holding ``rope_theta`` and ``rope_type``).

        Args:
          hf: the parsed ``config.json``; unknown keys are ignored.
          **overrides: field values that win over ``hf`` (e.g. ``dtype``, ``param_dtype``, ``scan_layers``,
            ``remat_policy``); None values are ignored.

        Returns:
          The frozen config.

        Raises:
          ValueError: unsupported ``model_type``, rope type, or per-layer (nested) RoPE parameters.

        Example::

          cfg = LlamaConfig.from_hf_dict(json.load(open("config.json")), dtype=jnp.bfloat16)
        """
        model_type = overrides.get("model_type", hf.get("model_type", "llama"))
        if model_type not in DECODER_MODEL_TYPES:
            raise ValueError(f"Unsupported model_type {model_type!r}; supported: {', '.join(DECODER_MODEL_TYPES)}")
        skip = {"dtype", "param_dtype", "scan_layers", "remat_policy", "rope_scaling", "rope_theta", "model_type",
                "qkv_bias", "o_bias", "sliding_window"}
        names = {f.name for f in dataclasses.fields(cls)} - skip
        values = {**_FAMILY_DEFAULTS[model_type], **{k: v for k, v in hf.items() if k in names and v is not None}}
        if hf.get("attention_bias"):  # Llama: one flag for q/k/v/o
            values.update(qkv_bias=True, o_bias=True)
        window = hf.get("sliding_window", values.pop("sliding_window", None))
        if model_type == "qwen2":  # only layers marked "sliding_attention" use it, and only when enabled
            sliding_layers = "sliding_attention" in (hf.get("layer_types") or ())
            if not hf.get("use_sliding_window", False) and not sliding_layers:
                window = None
        values["sliding_window"] = window
        rope: dict[str, Any] = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        if any(isinstance(v, Mapping) for v in rope.values()):
            raise ValueError(f"Per-layer-type RoPE parameters are not supported: {rope}")
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        values["rope_theta"] = float(theta)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        rope.setdefault("rope_type", "default")
        if rope["rope_type"] == "llama3":
            rope.setdefault("original_max_position_embeddings", values.get("max_position_embeddings", 2048))
        values["rope_scaling"] = None if rope == {"rope_type": "default"} else rope
        values.update({k: v for k, v in overrides.items() if v is not None and k != "model_type"})
        values["model_type"] = model_type
        return cls(**values)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[H/2]`` (float32), with linear or llama3 scaling, computed as HF does.

    Args:
      config: the architecture.

    Returns:
      A numpy float32 array (a compile-time constant).
    """
    H = config.head_dim
    exponents = np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / np.float32(H)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    rope = config.rope_parameters
    if rope["rope_type"] == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    if rope["rope_type"] == "llama3":
        factor, low, high = (np.float32(rope[k]) for k in _LLAMA3_KEYS)
        old_len = np.float32(rope.get("original_max_position_embeddings", config.max_position_embeddings))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(position_ids_BxT: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [B, T, H]`` for the given positions: angles in float32, cast to the compute dtype (as HF)."""
    inv_freq_h = jnp.asarray(rope_inv_freq(config))
    angles_BxTxh = position_ids_BxT.astype(jnp.float32)[:, :, None] * inv_freq_h[None, None, :]
    angles_BxTxH = jnp.concatenate([angles_BxTxh, angles_BxTxh], axis=-1)
    return jnp.cos(angles_BxTxH).astype(config.dtype), jnp.sin(angles_BxTxH).astype(config.dtype)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """HF's ``x * cos + rotate_half(x) * sin`` (halves, not interleaved pairs)."""
    half = x_BxTxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    return x_BxTxNxH * cos_BxTxH[:, :, None, :] + rotated * sin_BxTxH[:, :, None, :]


def position_ids_from_mask(attention_mask_BxS: jax.Array) -> jax.Array:
    """Positions that skip padding, as HF's ``generate``: ``cumsum(mask) - 1`` on real tokens, 0 on padding.

    Left-padded rows start at position 0 on their first real token; right padding gives ``0..len-1``.
    """
    mask_BxS = attention_mask_BxS.astype(jnp.int32)
    return jnp.where(mask_BxS == 1, jnp.cumsum(mask_BxS, axis=1) - 1, 0)


def _dense(cfg: LlamaConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    """A plain ``nn.Dense`` with HF's init (normal(initializer_range) kernel, zero bias)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


class RMSNorm(nn.Module):
    """HF's ``LlamaRMSNorm``: statistics in float32, cast back to the compute dtype, then times ``scale``."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD):
        scale_D = self.param("scale", nn.initializers.ones, (x_BxTxD.shape[-1],), self.param_dtype)
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        var_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
        y_BxTxD = (x32_BxTxD * jax.lax.rsqrt(var_BxTx1 + self.eps)).astype(self.dtype)
        return scale_D.astype(self.dtype)[None, None, :] * y_BxTxD


def _rms_norm(cfg: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def _bottleneck_hook(module: nn.Module, h_BxTxD: jax.Array) -> jax.Array:
    """Hook point of a sub-layer's output (before the residual add): ``h + a(h)`` when ``module``'s params hold a
    bottleneck adapter (``jgoat.add_bottleneck``), else h unchanged."""
    from jgoat.adapters.bottleneck import apply_hook  # lazy: jgoat.adapters does not depend on the models

    return apply_hook(module, h_BxTxD)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE (HF ``self_attn``) and an optional KV cache.

    Attributes:
      decode: read/write the ``'cache'`` collection (``cached_key`` / ``cached_value`` ``[B, S, K, H]``, S the
        cache length); keys/values of the ``T`` new tokens are written at slots ``slot0 .. slot0 + T - 1``.
      deterministic: disables attention dropout.
    """

    config: LlamaConfig
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD, keep_Bx1x1xTxS, cos_BxTxH, sin_BxTxH, slot0, prefix_2xPxKxH=None):
        cfg = self.config
        B, T, _ = x_BxTxD.shape
        N, K, G, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_groups, cfg.head_dim
        q_BxTxNxH = _dense(cfg, N * H, cfg.qkv_bias, "q_proj")(x_BxTxD).reshape(B, T, N, H)
        k_BxTxKxH = _dense(cfg, K * H, cfg.qkv_bias, "k_proj")(x_BxTxD).reshape(B, T, K, H)
        v_BxTxKxH = _dense(cfg, K * H, cfg.qkv_bias, "v_proj")(x_BxTxD).reshape(B, T, K, H)
        q_BxTxNxH = apply_rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH)
        k_BxSxKxH = apply_rope(k_BxTxKxH, cos_BxTxH, sin_BxTxH)
        v_BxSxKxH = v_BxTxKxH
        if self.decode:
            S = keep_Bx1x1xTxS.shape[-1]
            cached_k = self.variable("cache", "cached_key", jnp.zeros, (B, S, K, H), cfg.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, (B, S, K, H), cfg.dtype)
            start = (0, slot0, 0, 0)
            cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxSxKxH.astype(cfg.dtype), start)
            cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxSxKxH.astype(cfg.dtype), start)
            k_BxSxKxH, v_BxSxKxH = cached_k.value, cached_v.value
        if prefix_2xPxKxH is not None:  # hook point (prefix tuning): p un-rotated keys / values first, always kept
            P = prefix_2xPxKxH.shape[1]
            pre_2xBxPxKxH = jnp.broadcast_to(prefix_2xPxKxH[:, None].astype(cfg.dtype), (2, B, P, K, H))
            k_BxSxKxH = jnp.concatenate([pre_2xBxPxKxH[0], k_BxSxKxH.astype(cfg.dtype)], axis=1)
            v_BxSxKxH = jnp.concatenate([pre_2xBxPxKxH[1], v_BxSxKxH.astype(cfg.dtype)], axis=1)
            ones_Bx1x1xTxP = jnp.ones((*keep_Bx1x1xTxS.shape[:-1], P), bool)
            keep_Bx1x1xTxS = jnp.concatenate([ones_Bx1x1xTxP, keep_Bx1x1xTxS], axis=-1)
        # Query head n uses KV head n // G (HF's repeat_kv): split N as (K, G).
        q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, G, H)
        scores_BxKxGxTxS = jnp.einsum(
            "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
        ).astype(jnp.float32) * (H**-0.5)
        scores_BxKxGxTxS = jnp.where(keep_Bx1x1xTxS, scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
        probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(cfg.dtype)
        if cfg.attention_dropout > 0:
            probs_BxKxGxTxS = nn.Dropout(cfg.attention_dropout)(probs_BxKxGxTxS, deterministic=self.deterministic)
        out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH.astype(cfg.dtype))
        o_BxTxD = _dense(cfg, cfg.hidden_size, cfg.o_bias, "o_proj")(out_BxTxKxGxH.reshape(B, T, N * H))
        return _bottleneck_hook(self, o_BxTxD)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        gate_BxTxF = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x_BxTxD)
        up_BxTxF = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x_BxTxD)
        h_BxTxF = _ACTIVATIONS[cfg.hidden_act](gate_BxTxF) * up_BxTxF
        return _bottleneck_hook(self, _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(h_BxTxF))


class LlamaMoeMLP(nn.Module):
    """Upcycled MoE: ``Σ_e g_e(x) · SwiGLU_e(x)``, g the router softmax kept on its top k and renormalised to sum 1.

    Params (``mlp/``): ``router`` [D, E], ``gate_proj`` / ``up_proj`` [E, D, F], ``down_proj`` [E, F, D] (plain
    arrays, so adapters' "all-linear" does not target them). Every expert runs on every token (dense dispatch, E × the
    MLP's FLOPs); with all experts equal to one MLP the output is that MLP's (the upcycling identity).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        E, D, F = cfg.moe_experts, cfg.hidden_size, cfg.intermediate_size
        init = nn.initializers.normal(cfg.initializer_range)
        router_DxE = self.param("router", init, (D, E), cfg.param_dtype)
        gate_ExDxF = self.param("gate_proj", init, (E, D, F), cfg.param_dtype).astype(cfg.dtype)
        up_ExDxF = self.param("up_proj", init, (E, D, F), cfg.param_dtype).astype(cfg.dtype)
        down_ExFxD = self.param("down_proj", init, (E, F, D), cfg.param_dtype).astype(cfg.dtype)
        x_BxTxD = x_BxTxD.astype(cfg.dtype)
        p_BxTxE = jax.nn.softmax(jnp.einsum("btd,de->bte", x_BxTxD.astype(jnp.float32),
                                            router_DxE.astype(jnp.float32)), axis=-1)
        w_BxTxK, idx_BxTxK = jax.lax.top_k(p_BxTxE, cfg.moe_top_k)
        w_BxTxK = w_BxTxK / jnp.sum(w_BxTxK, axis=-1, keepdims=True)
        g_BxTxE = jnp.sum(jax.nn.one_hot(idx_BxTxK, E, dtype=jnp.float32) * w_BxTxK[..., None], axis=-2)
        gate_BxTxExF = jnp.einsum("btd,edf->btef", x_BxTxD, gate_ExDxF)
        h_BxTxExF = _ACTIVATIONS[cfg.hidden_act](gate_BxTxExF) * jnp.einsum("btd,edf->btef", x_BxTxD, up_ExDxF)
        y_BxTxExD = jnp.einsum("btef,efd->bted", h_BxTxExF, down_ExFxD)
        return _bottleneck_hook(self, jnp.einsum("bted,bte->btd", y_BxTxExD, g_BxTxE.astype(cfg.dtype)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm layer: ``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``.

    Written as a scan body: returns ``(x, x if emit_hidden else None)``.
    """

    config: LlamaConfig
    decode: bool = False
    deterministic: bool = True
    emit_hidden: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, keep_Bx1x1xTxS, cos_BxTxH, sin_BxTxH, slot0, prefix_2xPxKxH=None):
        cfg = self.config
        attn = LlamaAttention(cfg, decode=self.decode, deterministic=self.deterministic, name="self_attn")
        h_BxTxD = _rms_norm(cfg, "input_layernorm")(x_BxTxD)
        x_BxTxD = x_BxTxD + attn(h_BxTxD, keep_Bx1x1xTxS, cos_BxTxH, sin_BxTxH, slot0, prefix_2xPxKxH)
        h_BxTxD = _rms_norm(cfg, "post_attention_layernorm")(x_BxTxD)
        x_BxTxD = x_BxTxD + (LlamaMoeMLP if cfg.moe_experts else LlamaMLP)(cfg, name="mlp")(h_BxTxD)
        return x_BxTxD, (x_BxTxD if self.emit_hidden else None)


class LlamaModelOutput(NamedTuple):
    """Outputs of :class:`LlamaModel`."""

    last_hidden_state: jax.Array  # [B, T, D], after the final norm
    hidden_states: tuple[jax.Array, ...] | None  # L + 1 arrays [B, T, D] as HF (last one normed), or None


class CausalLMOutput(NamedTuple):
    """Outputs of :class:`LlamaForCausalLM`."""

    logits: jax.Array  # [B, T, V] (or [B, 1, V] with only_last_logits), compute dtype
    hidden_states: tuple[jax.Array, ...] | None  # as LlamaModelOutput.hidden_states


def _check_key_length(cfg: LlamaConfig, S: int) -> None:
    if cfg.sliding_window is not None and S > cfg.sliding_window:
        raise ValueError(
            f"{cfg.model_type} sliding_window={cfg.sliding_window} is not implemented: key length {S} exceeds it "
            "(sequences up to the window are exact)"
        )


class LlamaModel(nn.Module):
    """The bare decoder (HF ``LlamaModel`` / ``MistralModel`` / ``Qwen2Model``): embeddings, layers, final norm.

    Hook points (``jgoat_hooks``): params ``model/jgoat_prompt`` (prompt tuning) and ``model/jgoat_prefix`` (prefix
    tuning), added by ``jgoat.add_prompt`` / ``jgoat.add_prefix`` and read here when present (see
    :mod:`jgoat.adapters.prompt`); bottleneck adapters ``.../self_attn/jgoat_bottleneck`` and
    ``.../mlp/jgoat_bottleneck`` of every layer (``jgoat.add_bottleneck``), read by those sub-layers on their output
    (see :mod:`jgoat.adapters.bottleneck`).
    """

    config: LlamaConfig
    jgoat_hooks = ("prompt", "prefix", "bottleneck")  # not a field: the graph-changing methods this model implements

    @nn.compact
    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids_BxT: jax.Array | None = None,
        *,
        decode: bool = False,
        prompt_in_cache: bool = False,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> LlamaModelOutput:
        """Runs the decoder.

        Args:
          input_ids_BxT: int token ids.
          attention_mask: 1 for real tokens, 0 for padding (left or right). Without ``decode``: ``[B, T]`` (None:
            all ones). With ``decode``: ``[B, S]`` over the whole KV cache (prompt mask, then ones), required.
          position_ids_BxT: None gives :func:`position_ids_from_mask` (HF ``generate``'s positions; for a
            right-padded or unpadded batch these are ``0..T-1`` on real tokens, as HF's forward).
          decode: use and update the ``'cache'`` collection (pass ``mutable=["cache"]``); the new tokens go to the
            slots after those already cached (``cache/model/index``). With prompt tuning the p virtual tokens take
            cache slots ``0..p-1`` (the cache needs p extra slots) and ``attention_mask`` covers the other slots.
          prompt_in_cache: decode with prompt tuning only: the virtual tokens are already cached (every call after
            the prefill, which must be the first call on the cache and prepends them); ignored otherwise.
          deterministic: disables attention dropout.
          output_hidden_states: also return every layer's input and the final normed state.

        Returns:
          :class:`LlamaModelOutput`.
        """
        from jgoat.adapters.prompt import read_hooks  # lazy: jgoat.adapters does not depend on the models

        cfg = self.config
        B, T = input_ids_BxT.shape
        prompt_PxD, prefix_Lx2xPxKxH = read_hooks(self, cfg)  # hook points: None unless params hold them
        n_prompt = 0 if prompt_PxD is None else prompt_PxD.shape[0]
        n_prefix = 0 if prefix_Lx2xPxKxH is None else prefix_Lx2xPxKxH.shape[2]
        n_virtual = n_prompt if not (decode and prompt_in_cache) else 0  # virtual tokens this call prepends
        if decode:
            if attention_mask is None:
                raise ValueError("decode=True needs attention_mask [B, cache_length] (prompt mask, then ones)")
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            slot0 = index.value
            index.value = slot0 + T + n_virtual
        else:
            slot0 = jnp.zeros((), jnp.int32)
            if attention_mask is None:
                attention_mask = jnp.ones((B, T), jnp.int32)
        S = attention_mask.shape[1]
        if attention_mask.shape != (B, S) or (not decode and S != T):
            want = "[B, cache_length]" if decode else f"{(B, T)}"
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {want}")
        if n_prompt:  # prompt tuning (as peft): virtual tokens first, mask ones, positions 0..p-1, then the real ones
            attention_mask = jnp.concatenate([jnp.ones((B, n_prompt), attention_mask.dtype), attention_mask], axis=1)
            if position_ids_BxT is not None:
                virtual_BxV = jnp.broadcast_to(jnp.arange(n_virtual, dtype=jnp.int32)[None], (B, n_virtual))
                position_ids_BxT = jnp.concatenate([virtual_BxV, position_ids_BxT + n_prompt], axis=1)
            T, S = T + n_virtual, S + n_prompt
        _check_key_length(cfg, S + n_prefix)
        if position_ids_BxT is None:
            position_ids_BxT = jax.lax.dynamic_slice_in_dim(position_ids_from_mask(attention_mask), slot0, T, axis=1)
            # prefix tuning: HF sees the prefix as p cached tokens, so real tokens' positions start at p
            position_ids_BxT = position_ids_BxT + n_prefix
        # Causal over cache slots and key padding, sized [B, T, S] to the real sequence.
        q_slot_T = slot0 + jnp.arange(T, dtype=jnp.int32)
        causal_TxS = jnp.arange(S, dtype=jnp.int32)[None, :] <= q_slot_T[:, None]
        keep_BxTxS = causal_TxS[None, :, :] & attention_mask.astype(bool)[:, None, :]
        keep_Bx1x1xTxS = keep_BxTxS[:, None, None, :, :]
        cos_BxTxH, sin_BxTxH = rope_cos_sin(position_ids_BxT, cfg)

        x_BxTxD = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            name="embed_tokens",
        )(input_ids_BxT)
        if n_virtual:
            prompt_BxPxD = jnp.broadcast_to(prompt_PxD.astype(cfg.dtype)[None], (B, n_prompt, cfg.hidden_size))
            x_BxTxD = jnp.concatenate([prompt_BxPxD, x_BxTxD.astype(cfg.dtype)], axis=1)
        layer_cls = LlamaDecoderLayer
        if cfg.remat_policy is not None and not decode:
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        kwargs = dict(decode=decode, deterministic=deterministic, emit_hidden=output_hidden_states)
        args = (keep_Bx1x1xTxS, cos_BxTxH, sin_BxTxH, slot0)
        hidden: list[jax.Array] = [x_BxTxD]
        if cfg.scan_layers:
            in_axes = (nn.broadcast,) * len(args)
            if n_prefix:  # layer i reads prefix[i]
                args, in_axes = (*args, prefix_Lx2xPxKxH), (*in_axes, 0)
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "jgoat_aux": 0, "jgoat_load": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=in_axes,
                length=cfg.num_hidden_layers,
            )
            x_BxTxD, ys_LxBxTxD = scanned(cfg, **kwargs, name="layers")(x_BxTxD, *args)
            if output_hidden_states:
                hidden += [ys_LxBxTxD[i] for i in range(cfg.num_hidden_layers)]
        else:
            for i in range(cfg.num_hidden_layers):
                layer_args = (*args, prefix_Lx2xPxKxH[i]) if n_prefix else args
                x_BxTxD, _ = layer_cls(cfg, **kwargs, name=f"layers_{i}")(x_BxTxD, *layer_args)
                hidden.append(x_BxTxD)
        x_BxTxD = _rms_norm(cfg, "norm")(x_BxTxD)
        if n_virtual:  # outputs for the real positions only (labels stay [B, T])
            x_BxTxD = x_BxTxD[:, n_prompt:]
            hidden = [h_BxTxD[:, n_prompt:] for h_BxTxD in hidden]
        if not output_hidden_states:
            return LlamaModelOutput(x_BxTxD, None)
        return LlamaModelOutput(x_BxTxD, (*hidden[: cfg.num_hidden_layers], x_BxTxD))


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head (HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``).

    Params: ``model/...`` and ``lm_head/kernel [D, V]`` (absent when ``tie_word_embeddings``: the head is then
    ``embed_tokens``, transposed). Hook points: as :class:`LlamaModel`.
    """

    config: LlamaConfig
    jgoat_hooks = ("prompt", "prefix", "bottleneck")  # not a field: see LlamaModel

    @nn.compact
    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids_BxT: jax.Array | None = None,
        *,
        decode: bool = False,
        prompt_in_cache: bool = False,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        only_last_logits: bool = False,
    ) -> CausalLMOutput:
        """Next-token logits for a batch of sequences.

        Args:
          input_ids_BxT, attention_mask, position_ids_BxT, decode, prompt_in_cache, deterministic,
            output_hidden_states: as :meth:`LlamaModel.__call__`.
          only_last_logits: compute the head on the last position only (logits ``[B, 1, V]``), as generation needs.

        Returns:
          :class:`CausalLMOutput` (logits in the compute dtype; padded positions hold garbage).

        Example::

          logits_BxTxV = model.apply({"params": params}, ids_BxT, mask_BxT).logits
          loss = causal_lm_loss(logits_BxTxV, labels_BxT)
        """
        cfg = self.config
        out = LlamaModel(cfg, name="model")(
            input_ids_BxT,
            attention_mask,
            position_ids_BxT,
            decode=decode,
            prompt_in_cache=prompt_in_cache,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
        )
        h_BxTxD = out.last_hidden_state[:, -1:] if only_last_logits else out.last_hidden_state
        if cfg.tie_word_embeddings:
            embedding_VxD = self.variables["params"]["model"]["embed_tokens"]["embedding"]
            logits_BxTxV = jnp.einsum("btd,vd->btv", h_BxTxD, embedding_VxD.astype(cfg.dtype))
        else:
            logits_BxTxV = _dense(cfg, cfg.vocab_size, False, "lm_head")(h_BxTxD)
        return CausalLMOutput(logits_BxTxV, out.hidden_states)


@functools.partial(jax.jit, static_argnames=("ignore_index", "reduction"))
def causal_lm_loss(
    logits_BxTxV: jax.Array,
    labels_BxT: jax.Array,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> jax.Array:
    """Next-token cross-entropy as HF's ``ForCausalLMLoss``: position t predicts ``labels[t + 1]``.

    Labels equal to ``ignore_index`` (prompt tokens, padding) contribute nothing. Computed in float32.

    Args:
      logits_BxTxV: model logits (any float dtype).
      labels_BxT: int targets, usually the input ids with prompt / padding positions set to -100.
      ignore_index: label value to skip.
      reduction: "mean" over the counted tokens (HF's default; 0.0 rather than NaN when none is counted) or
        "sum" (divide by a global token count yourself under gradient accumulation).

    Returns:
      A float32 scalar.

    Example::

      labels = jnp.where(prompt_mask_BxT | (attention_mask_BxT == 0), -100, ids_BxT)
      loss = causal_lm_loss(model.apply({"params": p}, ids_BxT, attention_mask_BxT).logits, labels)
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logits_BxTxV = logits_BxTxV[:, :-1].astype(jnp.float32)
    targets_BxT = labels_BxT[:, 1:]
    valid_BxT = targets_BxT != ignore_index
    safe_BxT = jnp.where(valid_BxT, targets_BxT, 0)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, safe_BxT[:, :, None], axis=-1)[:, :, 0]
    nll_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1) - picked_BxT
    total = jnp.sum(jnp.where(valid_BxT, nll_BxT, 0.0))
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(valid_BxT), 1).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Scanned <-> unrolled parameters


def unstack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Scanned params (``model/layers/...`` with a leading layer axis) -> unrolled ``model/layers_{i}/...``.

    Works on any pytree below ``layers`` (adapters included: every array leaf is sliced on axis 0).
    """
    params = dict(params)
    model = dict(params["model"])
    stacked = model.pop("layers")
    for i in range(num_layers):
        model[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    params["model"] = model
    return params


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Inverse of :func:`unstack_layers`."""
    params = dict(params)
    model = dict(params["model"])
    layers = [model.pop(f"layers_{i}") for i in range(num_layers)]
    model["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    params["model"] = model
    return params


# ---------------------------------------------------------------------------------------------------------------
# KV-cache generation


@functools.cache
def _cache_shapes(config: LlamaConfig, batch_size: int, max_length: int):
    ids = jnp.zeros((batch_size, max_length), jnp.int32)
    model = LlamaForCausalLM(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids), decode=True)["cache"])


def init_cache(model: LlamaForCausalLM, batch_size: int, max_length: int) -> dict[str, Any]:
    """A zero KV cache (``'cache'`` collection) for ``batch_size`` rows and ``max_length`` slots.

    Nothing is computed to get the shapes (``jax.eval_shape``). Cached keys/values are ``[L, B, S, K, H]`` when
    scanned (``[B, S, K, H]`` per ``layers_{i}`` otherwise), in the compute dtype; ``model/index`` counts the
    slots filled.

    Example::

      cache = init_cache(model, 4, 128)
      out, state = model.apply({"params": p, "cache": cache}, ids_4xT, mask_4x128, decode=True, mutable=["cache"])
    """
    shapes = _cache_shapes(model.config, batch_size, max_length)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _next_token(logits_BxV, key, greedy, temperature, top_k: int | None):
    """``argmax(logits / temperature + Gumbel noise)``, a sample of ``softmax(logits / temperature)`` (the Gumbel-max
    trick, as ``jax.random.categorical``); ``greedy`` (traced) drops the noise, so both modes share one compile."""
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    noise_BxV = jax.random.gumbel(key, logits_BxV.shape, jnp.float32)
    return jnp.argmax(jnp.where(greedy, logits_BxV, logits_BxV + noise_BxV), axis=-1).astype(jnp.int32)


@functools.cache
def _generation_fns(config: LlamaConfig, top_k: int | None):
    """(prefill, decode), jitted once per (config, top_k); shapes are jit's business, and greedy / temperature /
    EOS / pad are traced, so changing them does not recompile."""
    from jgoat.apply import apply as apply_with_adapters  # lazy: jgoat.apply does not depend on the models

    model = LlamaForCausalLM(config)
    run = apply_with_adapters(model.apply)

    def forward(params, cache, ids_BxT, mask_BxS, prompt_in_cache):
        out, _, state = run(
            {"params": params, "cache": cache}, ids_BxT, mask_BxS, decode=True, prompt_in_cache=prompt_in_cache,
            only_last_logits=True, mutable=["cache"],
        )
        return out.logits[:, -1], state["cache"]

    def prefill(params, cache, ids_BxT, mask_BxS, key, greedy, temperature):
        logits_BxV, cache = forward(params, cache, ids_BxT, mask_BxS, False)  # prompt tuning: caches the virtual ones
        return _next_token(logits_BxV, jax.random.fold_in(key, 0), greedy, temperature, top_k), cache

    def decode(params, cache, first_B, mask_BxS, key, greedy, temperature, eos_E, pad_id, max_new_tokens):
        B = first_B.shape[0]
        tokens_BxM = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)

        def is_eos(tok_B):
            return jnp.any(tok_B[:, None] == eos_E[None, :], axis=1)

        def cond(state):
            i, _, _, done_B = state
            return (i < max_new_tokens) & ~jnp.all(done_B)

        def body(state):
            i, tokens_BxM, cache, done_B = state
            prev_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxM, i - 1, 1, axis=1)
            logits_BxV, cache = forward(params, cache, prev_Bx1, mask_BxS, True)
            tok_B = _next_token(logits_BxV, jax.random.fold_in(key, i), greedy, temperature, top_k)
            tok_B = jnp.where(done_B, pad_id, tok_B)
            tokens_BxM = jax.lax.dynamic_update_slice_in_dim(tokens_BxM, tok_B[:, None], i, axis=1)
            return i + 1, tokens_BxM, cache, done_B | is_eos(tok_B)

        state = (jnp.ones((), jnp.int32), tokens_BxM, cache, is_eos(first_B))
        _, tokens_BxM, _, _ = jax.lax.while_loop(cond, body, state)
        return tokens_BxM

    # The prefill's cache is donated (updated in place); the decode loop's cache never leaves it.
    return jax.jit(prefill, donate_argnums=(1,)), jax.jit(decode, static_argnums=(9,))


def generate(
    model: LlamaForCausalLM,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Greedy or sampled generation with a preallocated KV cache, under jit.

    One jitted prefill over the (left-padded) prompts fills cache slots ``0..T-1``; one jitted
    ``lax.while_loop`` then decodes a token per step into a cache of ``T + max_new_tokens`` slots, stopping early
    once every row has produced an EOS. Adapters in ``params`` (``jgoat.wrap``) are live (``jgoat.apply``), and so
    are prompt tuning (the p virtual tokens are prefilled into p extra cache slots, as peft's generate) and prefix
    tuning (``jgoat.add_prompt`` / ``jgoat.add_prefix``).

    Args:
      model: a :class:`LlamaForCausalLM` (only its ``config`` is used).
      params: its params (optionally wrapped with adapters).
      input_ids: ``[B, T]`` prompts, LEFT-padded (the next token is read from the last column).
      attention_mask: ``[B, T]`` 1 on real tokens; None means no padding.
      max_new_tokens: tokens to generate per row.
      greedy: argmax decoding (HF ``do_sample=False``); False samples from ``softmax(logits / temperature)``.
      temperature: sampling temperature (> 0).
      top_k: sample among the k most likely tokens only (None: the whole vocabulary).
      key: PRNG key, required when sampling (step i uses ``fold_in(key, i)``).
      eos_token_id: id(s) that finish a row; later tokens of that row are ``pad_token_id``.
      pad_token_id: filler after EOS (default: the first EOS id, as HF, else 0).

    Returns:
      int32 ``[B, T + max_new_tokens]``: the prompts followed by the generated tokens.

    Example::

      out_BxN = generate(model, params, ids_BxT, mask_BxT, max_new_tokens=256, eos_token_id=tok.eos_token_id)
      texts = tok.batch_decode(out_BxN[:, ids_BxT.shape[1]:], skip_special_tokens=True)
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy:
        if key is None:
            raise ValueError("sampling (greedy=False) needs a PRNG key")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and not 0 < top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
    eos_ids = [] if eos_token_id is None else np.atleast_1d(np.asarray(eos_token_id)).astype(int).tolist()
    pad_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    eos_E = jnp.asarray(eos_ids or [-1], jnp.int32)  # -1: no token is EOS
    input_ids = jnp.asarray(input_ids, jnp.int32)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    mask_BxS = jnp.concatenate(
        [jnp.asarray(attention_mask, jnp.int32), jnp.ones((B, max_new_tokens), jnp.int32)], axis=1
    )
    from jgoat.adapters.prompt import num_virtual_tokens  # lazy: jgoat.adapters does not depend on the models

    n_virtual = num_virtual_tokens(params)  # prompt tuning: p extra cache slots
    _check_key_length(model.config, n_virtual + T + max_new_tokens)
    prefill, decode = _generation_fns(model.config, None if greedy else top_k)
    key = jax.random.key(0) if key is None else key
    greedy_ = jnp.asarray(bool(greedy))
    temperature_ = jnp.asarray(1.0 if greedy else temperature, jnp.float32)
    cache = init_cache(model, B, n_virtual + T + max_new_tokens)
    first_B, cache = prefill(params, cache, input_ids, mask_BxS, key, greedy_, temperature_)
    new_BxM = decode(
        params, cache, first_B, mask_BxS, key, greedy_, temperature_, eos_E, jnp.asarray(pad_id, jnp.int32),
        max_new_tokens,
    )
    return jnp.concatenate([input_ids, new_BxM], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Loading HF checkpoints (called by jgoat.models.hf.from_pretrained)

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Non-persistent torch buffers that old checkpoints still contain: reported in LoadingInfo.unused, not logged.
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_key(flax_path: tuple[str, ...]) -> tuple[str, bool, bool]:
    """Maps a Flax parameter path of :class:`LlamaForCausalLM` to its HF key.

    Args:
      flax_path: e.g. ``("model", "layers", "self_attn", "q_proj", "kernel")`` (scanned) or
        ``("model", "layers_1", "mlp", "up_proj", "kernel")``.

    Returns:
      ``(key, transpose, stacked)``: for a scanned leaf ``key`` holds ``{i}`` for the layer index, e.g.
      ``("model.layers.{i}.self_attn.q_proj.weight", True, True)``.
    """
    *modules, leaf = flax_path
    stacked = modules[:2] == ["model", "layers"]
    if stacked:
        modules[1] = "layers.{i}"
    elif len(modules) > 1 and modules[1].startswith("layers_"):
        modules[1] = f"layers.{modules[1][len('layers_') :]}"
    return ".".join([*modules, _LEAF_NAMES[leaf]]), leaf == "kernel", stacked


def _canonical(key: str) -> str:
    """Bare-decoder checkpoints (``embed_tokens.weight``, ``layers.0...``) get the ``model.`` prefix."""
    return key if key.startswith(("model.", "lm_head.")) else f"model.{key}"


def load_causal_lm(
    folder: str | os.PathLike,
    hf_config: dict[str, Any],
    *,
    task: str = "causal-lm",
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    scan_layers: bool = True,
    remat_policy: str | None = None,
    output_loading_info: bool = False,
):
    """Builds :class:`LlamaForCausalLM` and its params from a HF checkpoint folder (``from_pretrained`` calls it).

    Tensors are streamed one at a time: each stacked (scanned) param is a preallocated host array filled layer by
    layer (linears transposed from torch's ``[out, in]``), then moved to the device once.
    """
    from jgoat.models.formats import empty_aligned, transpose_into
    from jgoat.models.hf import LoadingInfo, _checkpoint_files, _Reader  # lazy: hf imports this module

    folder = pathlib.Path(folder)
    if task not in DECODER_TASKS:
        raise ValueError(f"Unknown task {task!r} for {hf_config.get('model_type')}; supported: "
                         f"{', '.join(DECODER_TASKS)}")
    param_dtype = dtype if param_dtype is None else param_dtype
    config = LlamaConfig.from_hf_dict(
        hf_config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat_policy=remat_policy
    )
    model = LlamaForCausalLM(config)
    dummy_1x1 = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_1x1))["params"]

    files = _checkpoint_files(folder)
    canonical: dict[str, str] = {}
    for ck in files:
        name = _canonical(ck)
        if name in canonical:
            raise ValueError(f"Checkpoint keys {canonical[name]!r} and {ck!r} both map to {name!r}")
        canonical[name] = ck

    reader = _Reader()
    np_dtype = np.dtype(param_dtype)
    flat: dict[tuple[str, ...], jax.Array] = {}
    used: set[str] = set()
    missing, mismatched = [], []
    for fpath, want in traverse_util.flatten_dict(shapes).items():
        template, transpose, stacked = hf_key(fpath)
        names = [template.format(i=i) for i in range(want.shape[0])] if stacked else [template]
        per_layer = want.shape[1:] if stacked else want.shape
        expected = per_layer[::-1] if transpose else per_layer
        ok = True
        for name in names:
            ck = canonical.get(name)
            if ck is None:
                missing.append(name)
                ok = False
                continue
            used.add(ck)
            shape = reader.shape(files[ck], ck)
            if shape != tuple(expected):  # both in the checkpoint's (torch) layout
                mismatched.append(f"{ck}: checkpoint {shape} vs expected {tuple(expected)}")
                ok = False
        if not ok or missing or mismatched:
            continue  # keep checking, load nothing more
        buffer = empty_aligned(want.shape, np_dtype)
        for j, name in enumerate(names):
            array = reader.read(files[canonical[name]], canonical[name])
            target = buffer[j] if stacked else buffer
            if transpose:
                transpose_into(target, array)  # tiled: ~3x faster than target[...] = array.T on big matrices
            else:
                target[...] = array
        # device_put adopts an aligned host buffer on the CPU backend (jnp.asarray would copy it: 2x peak memory).
        flat[fpath] = jax.device_put(buffer)
        del buffer
    if missing or mismatched:
        lines = [f"missing: {name}" for name in missing] + [f"shape mismatch: {m}" for m in mismatched]
        raise ValueError(f"Cannot load {folder} as {config.model_type} {task} (HF keys):\n  " + "\n  ".join(lines))

    info = LoadingInfo(newly_initialized=[], unused=sorted(set(files) - used))
    unused_weights = [k for k in info.unused if not k.endswith(_BUFFER_SUFFIXES)]
    if unused_weights:
        logger.warning("Unused checkpoint keys in %s: %s", folder, ", ".join(unused_weights))
    params = traverse_util.unflatten_dict(flat)
    return (model, params, config, info) if output_loading_info else (model, params, config)
