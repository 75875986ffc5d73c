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

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jgoat import hooks
from jgoat.models import attention
from jgoat.models.common import ACTIVATIONS
from jgoat.models.llama.config import IGNORE_INDEX, LLAMA3_KEYS, REMAT_POLICIES, LlamaConfig


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
        factor, low, high = (np.float32(rope[k]) for k in LLAMA3_KEYS)
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


def position_ids_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions of a packed batch: ``0..len-1`` within each example (segment), 0 on padding (segment id 0).

    A segment is a run of equal non-zero ids (the packer writes examples contiguously, ids 1, 2, ... per row).
    """
    seg_BxT = segment_ids_BxT.astype(jnp.int32)
    t_BxT = jnp.broadcast_to(jnp.arange(seg_BxT.shape[1], dtype=jnp.int32)[None], seg_BxT.shape)
    first_BxT = jnp.concatenate([jnp.ones_like(seg_BxT[:, :1], bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
    start_BxT = jax.lax.cummax(jnp.where(first_BxT, t_BxT, 0), axis=1)
    return jnp.where(seg_BxT != 0, t_BxT - start_BxT, 0)


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
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
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
        dropout = None
        if cfg.attention_dropout > 0 and not self.deterministic:
            drop = nn.Dropout(cfg.attention_dropout)
            dropout = functools.partial(drop, deterministic=False)
        out_BxTxNxH = attention.dot_product_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, keep_Bx1x1xTxS[:, 0], dtype=cfg.dtype, impl=cfg.attention_impl,
            dropout=dropout,
        )
        o_BxTxD = _dense(cfg, cfg.hidden_size, cfg.o_bias, "o_proj")(out_BxTxNxH.reshape(B, T, N * H))
        return hooks.bottleneck_output(self, o_BxTxD)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        gate_BxTxF = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x_BxTxD)
        up_BxTxF = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x_BxTxD)
        h_BxTxF = ACTIVATIONS[cfg.hidden_act](gate_BxTxF) * up_BxTxF
        return hooks.bottleneck_output(self, _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(h_BxTxF))


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
        h_BxTxExF = ACTIVATIONS[cfg.hidden_act](gate_BxTxExF) * jnp.einsum("btd,edf->btef", x_BxTxD, up_ExDxF)
        y_BxTxExD = jnp.einsum("btef,efd->bted", h_BxTxExF, down_ExFxD)
        return hooks.bottleneck_output(self, jnp.einsum("bted,bte->btd", y_BxTxExD, g_BxTxE.astype(cfg.dtype)))


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


def check_key_length(cfg: LlamaConfig, S: int) -> None:
    """Raise a ValueError when a key length S (sequence, or KV cache) exceeds the unimplemented sliding window."""
    if cfg.sliding_window is not None and S > cfg.sliding_window:
        raise ValueError(
            f"{cfg.model_type} sliding_window={cfg.sliding_window} is not implemented: key length {S} exceeds it "
            "(sequences up to the window are exact)"
        )


class LlamaModel(nn.Module):
    """The bare decoder (HF ``LlamaModel`` / ``MistralModel`` / ``Qwen2Model``): embeddings, layers, final norm.

    Hook points (``jgoat_hooks``): params ``model/jgoat_prompt`` (prompt tuning) and ``model/jgoat_prefix`` (prefix
    tuning), added by ``jgoat.add_prompt`` / ``jgoat.add_prefix`` and read here when present (see
    :mod:`jgoat.hooks`); bottleneck adapters ``.../self_attn/jgoat_bottleneck`` and
    ``.../mlp/jgoat_bottleneck`` of every layer (``jgoat.add_bottleneck``), read by those sub-layers on their output
    (:func:`jgoat.hooks.bottleneck_output`).
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
        segment_ids_BxT: jax.Array | None = None,
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
            right-padded or unpadded batch these are ``0..T-1`` on real tokens, as HF's forward), or with
            ``segment_ids_BxT`` :func:`position_ids_from_segments` (restarting at 0 per packed example).
          segment_ids_BxT: packed rows (several examples per row): int ``[B, T]``, 1, 2, ... per example, 0 on
            padding. Attention is causal within each example and never crosses one (:func:`attention.
            same_segment_mask`); ``attention_mask`` defaults to ``segment_ids_BxT != 0``. Not with ``decode`` nor
            prompt tuning (its virtual tokens are per row, not per example).
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
        cfg = self.config
        B, T = input_ids_BxT.shape
        prompt_PxD, prefix_Lx2xPxKxH = hooks.prompt_and_prefix(self, cfg)  # hook points: None unless params hold them
        n_prompt = 0 if prompt_PxD is None else prompt_PxD.shape[0]
        n_prefix = 0 if prefix_Lx2xPxKxH is None else prefix_Lx2xPxKxH.shape[2]
        n_virtual = n_prompt if not (decode and prompt_in_cache) else 0  # virtual tokens this call prepends
        if segment_ids_BxT is not None:
            if decode or n_prompt:
                raise ValueError("segment_ids (packed rows) cannot be used with decode=True or prompt tuning (its "
                                 "virtual tokens are per row, not per packed example): pass padded rows")
            if segment_ids_BxT.shape != (B, T):
                raise ValueError(f"segment_ids has shape {segment_ids_BxT.shape}, expected {(B, T)}")
            if attention_mask is None:
                attention_mask = (segment_ids_BxT != 0).astype(jnp.int32)
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
        check_key_length(cfg, S + n_prefix)
        if position_ids_BxT is None and segment_ids_BxT is not None:
            position_ids_BxT = position_ids_from_segments(segment_ids_BxT) + n_prefix
        elif position_ids_BxT is None:
            position_ids_BxT = jax.lax.dynamic_slice_in_dim(position_ids_from_mask(attention_mask), slot0, T, axis=1)
            # prefix tuning: HF sees the prefix as p cached tokens, so real tokens' positions start at p
            position_ids_BxT = position_ids_BxT + n_prefix
        # Causal over cache slots and key padding, sized [B, T, S] to the real sequence.
        q_slot_T = slot0 + jnp.arange(T, dtype=jnp.int32)
        causal_TxS = jnp.arange(S, dtype=jnp.int32)[None, :] <= q_slot_T[:, None]
        keep_BxTxS = causal_TxS[None, :, :] & attention_mask.astype(bool)[:, None, :]
        if segment_ids_BxT is not None:  # packed rows: causal within each example only
            keep_BxTxS = keep_BxTxS & attention.same_segment_mask(segment_ids_BxT)
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
        segment_ids_BxT: jax.Array | None = None,
        decode: bool = False,
        prompt_in_cache: bool = False,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        only_last_logits: bool = False,
    ) -> CausalLMOutput:
        """Next-token logits for a batch of sequences.

        Args:
          input_ids_BxT, attention_mask, position_ids_BxT, segment_ids_BxT, decode, prompt_in_cache,
            deterministic, output_hidden_states: as :meth:`LlamaModel.__call__`.
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
            segment_ids_BxT=segment_ids_BxT,
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
