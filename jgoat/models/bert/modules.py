"""BERT / RoBERTa encoders and sequence-classification heads in ``flax.linen``.

Module names mirror Hugging Face's torch modules, so parameter paths read like HF state-dict keys::

    bert/embeddings/word_embeddings/embedding                 <- bert.embeddings.word_embeddings.weight
    bert/encoder/layer_0/attention/self/query/{kernel,bias}   <- bert.encoder.layer.0.attention.self.query.*
    bert/encoder/layer_0/attention/output/dense, .../LayerNorm
    bert/encoder/layer_0/intermediate/dense, .../output/dense, .../output/LayerNorm
    bert/pooler/dense, classifier                             (BERT head)
    roberta/..., classifier/{dense,out_proj}                  (RoBERTa head, no pooler)

Every linear layer is a plain ``nn.Dense`` (kernel ``[in, out]``) so that adapter interceptors see it.
Shapes in names: B batch, T query length, S key length, D hidden size, N heads, H head size,
F intermediate size, C labels.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jgoat import hooks
from jgoat.models import attention
from jgoat.models.bert.config import BertConfig
from jgoat.models.common import ACTIVATIONS


def _dense(cfg: BertConfig, features: int, name: str) -> nn.Dense:
    """A plain ``nn.Dense`` with HF's init (normal(initializer_range) kernel, zero bias)."""
    return nn.Dense(
        features,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


def _layer_norm(cfg: BertConfig, name: str = "LayerNorm") -> nn.LayerNorm:
    # Two-pass variance, like torch, rather than flax's default E[x^2] - E[x]^2.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        use_fast_variance=False,
        name=name,
    )


def _embed(cfg: BertConfig, num: int, name: str) -> nn.Embed:
    return nn.Embed(
        num,
        cfg.hidden_size,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


def position_ids_from_input_ids(input_ids_BxT: jax.Array, padding_idx: int) -> jax.Array:
    """RoBERTa positions: ``padding_idx + 1, +2, ...`` over non-pad tokens, ``padding_idx`` on pad tokens.

    Same as HF ``create_position_ids_from_input_ids`` (no KV cache offset).

    Args:
      input_ids_BxT: token ids.
      padding_idx: the pad token id (RoBERTa: 1).

    Returns:
      int32 position ids ``[B, T]``.
    """
    mask_BxT = (input_ids_BxT != padding_idx).astype(jnp.int32)
    return jnp.cumsum(mask_BxT, axis=1) * mask_BxT + padding_idx


def attention_bias(attention_mask_BxS: jax.Array, dtype: Any) -> jax.Array:
    """Additive attention bias from a 1/0 padding mask: 0 where attended, ``finfo(dtype).min`` where masked.

    Args:
      attention_mask_BxS: 1 for real tokens, 0 for padding.
      dtype: dtype of the attention scores.

    Returns:
      ``[B, 1, 1, S]`` bias, broadcastable against ``[B, N, T, S]`` scores.
    """
    keep_BxS = attention_mask_BxS.astype(bool)
    bias_BxS = jnp.where(keep_BxS, jnp.zeros((), dtype), jnp.finfo(dtype).min)
    return bias_BxS[:, None, None, :]


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids_BxT, token_type_ids_BxT, position_ids_BxT, *, deterministic: bool):
        cfg = self.config
        x_BxTxD = _embed(cfg, cfg.vocab_size, "word_embeddings")(input_ids_BxT)
        x_BxTxD = x_BxTxD + _embed(cfg, cfg.type_vocab_size, "token_type_embeddings")(token_type_ids_BxT)
        x_BxTxD = x_BxTxD + _embed(cfg, cfg.max_position_embeddings, "position_embeddings")(position_ids_BxT)
        x_BxTxD = _layer_norm(cfg)(x_BxTxD)
        return nn.Dropout(cfg.hidden_dropout_prob)(x_BxTxD, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with separate ``query``/``key``/``value`` Dense (HF ``attention.self``)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxTxD, bias_Bx1x1xS, *, deterministic: bool):
        cfg = self.config
        B, T, _ = x_BxTxD.shape
        N, H = cfg.num_attention_heads, cfg.head_dim

        def heads(name):
            return _dense(cfg, cfg.hidden_size, name)(x_BxTxD).reshape(B, T, N, H)

        q_BxTxNxH, k_BxSxNxH, v_BxSxNxH = heads("query"), heads("key"), heads("value")
        dropout = None
        if cfg.attention_probs_dropout_prob > 0 and not deterministic:
            dropout = functools.partial(nn.Dropout(cfg.attention_probs_dropout_prob), deterministic=False)
        out_BxTxNxH = attention.dot_product_attention(
            q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, None, bias_Bx1xTxS=bias_Bx1x1xS, dtype=cfg.dtype,
            impl=cfg.attention_impl, dropout=dropout,
        )
        return out_BxTxNxH.reshape(B, T, N * H)


class BertSelfOutput(nn.Module):
    """``dense`` + dropout + residual + LayerNorm (HF ``attention.output``; ``output`` has the same shape)."""

    config: BertConfig

    @nn.compact
    def __call__(self, h_BxTxF, residual_BxTxD, *, deterministic: bool):
        cfg = self.config
        y_BxTxD = _dense(cfg, cfg.hidden_size, "dense")(h_BxTxF)
        y_BxTxD = nn.Dropout(cfg.hidden_dropout_prob)(y_BxTxD, deterministic=deterministic)
        y_BxTxD = hooks.bottleneck_output(self, y_BxTxD)  # hook point: y + a(y) when params hold a bottleneck adapter
        return _layer_norm(cfg)(y_BxTxD + residual_BxTxD)


class BertAttention(nn.Module):
    """HF ``attention``: ``self`` (the attention) and ``output`` (projection, residual, LayerNorm)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxTxD, bias_Bx1x1xS, *, deterministic: bool):
        a_BxTxD = BertSelfAttention(self.config, name="self")(x_BxTxD, bias_Bx1x1xS, deterministic=deterministic)
        return BertSelfOutput(self.config, name="output")(a_BxTxD, x_BxTxD, deterministic=deterministic)


class BertIntermediate(nn.Module):
    """HF ``intermediate``: ``dense`` to the intermediate size, then the activation."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        return ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "dense")(x_BxTxD))


class BertLayer(nn.Module):
    """One encoder layer: ``attention``, ``intermediate/dense`` + activation, ``output``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxTxD, bias_Bx1x1xS, deterministic: bool = True):
        cfg = self.config
        x_BxTxD = BertAttention(cfg, name="attention")(x_BxTxD, bias_Bx1x1xS, deterministic=deterministic)
        h_BxTxF = BertIntermediate(cfg, name="intermediate")(x_BxTxD)
        return BertSelfOutput(cfg, name="output")(h_BxTxF, x_BxTxD, deterministic=deterministic)


class BertEncoder(nn.Module):
    """Stack of ``layer_{i}`` encoder layers (optionally rematerialised)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxTxD, bias_Bx1x1xS, *, deterministic: bool):
        cfg = self.config
        # Under remat `deterministic` must be static: argnums count `self` as 0.
        layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if cfg.remat else BertLayer
        for i in range(cfg.num_hidden_layers):
            x_BxTxD = layer_cls(cfg, name=f"layer_{i}")(x_BxTxD, bias_Bx1x1xS, deterministic)
        return x_BxTxD


class BertPooler(nn.Module):
    """``dense`` + tanh on the first ([CLS] / <s>) token."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x_BxTxD[:, 0]))


class BertModelOutput(NamedTuple):
    """Outputs of :class:`BertModel`."""

    last_hidden_state: jax.Array  # [B, T, D]
    pooler_output: jax.Array | None  # [B, D], None without a pooler


class BertModel(nn.Module):
    """The bare BERT / RoBERTa encoder (HF ``BertModel`` / ``RobertaModel``).

    Attributes:
      config: the architecture.
      add_pooling_layer: whether to build ``pooler`` (HF default True; RoBERTa classification omits it).
    """

    config: BertConfig
    add_pooling_layer: bool = True
    jgoat_hooks = ("bottleneck",)  # not a field: bottleneck adapters (jgoat.add_bottleneck) are read by the layers

    @nn.compact
    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask_BxT: jax.Array | None = None,
        token_type_ids_BxT: jax.Array | None = None,
        position_ids_BxT: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> BertModelOutput:
        """Encodes a batch of token ids.

        Args:
          input_ids_BxT: int token ids.
          attention_mask_BxT: 1 for real tokens, 0 for padding; None attends to everything.
          token_type_ids_BxT: segment ids; None means all zeros.
          position_ids_BxT: None gives ``0..T-1`` (BERT) or HF's pad-aware positions (RoBERTa).
          deterministic: disables dropout; when False a ``'dropout'`` rng is needed.

        Returns:
          ``BertModelOutput(last_hidden_state [B, T, D], pooler_output [B, D] or None)``.
        """
        cfg = self.config
        B, T = input_ids_BxT.shape
        if position_ids_BxT is None:
            if cfg.model_type == "roberta":
                position_ids_BxT = position_ids_from_input_ids(input_ids_BxT, cfg.pad_token_id)
            else:
                position_ids_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
        offset = cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0
        if T + offset > cfg.max_position_embeddings:
            raise ValueError(f"Sequence length {T} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        if token_type_ids_BxT is None:
            token_type_ids_BxT = jnp.zeros((B, T), jnp.int32)
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones((B, T), jnp.int32)

        x_BxTxD = BertEmbeddings(cfg, name="embeddings")(
            input_ids_BxT, token_type_ids_BxT, position_ids_BxT, deterministic=deterministic
        )
        bias_Bx1x1xT = attention_bias(attention_mask_BxT, cfg.dtype)
        x_BxTxD = BertEncoder(cfg, name="encoder")(x_BxTxD, bias_Bx1x1xT, deterministic=deterministic)
        pooled_BxD = BertPooler(cfg, name="pooler")(x_BxTxD) if self.add_pooling_layer else None
        return BertModelOutput(x_BxTxD, pooled_BxD)


class RobertaClassificationHead(nn.Module):
    """HF's RoBERTa head: dropout, ``dense`` + tanh, dropout, ``out_proj`` on the <s> token."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxTxD, *, deterministic: bool):
        cfg = self.config
        dropout = nn.Dropout(cfg.head_dropout)
        h_BxD = dropout(x_BxTxD[:, 0], deterministic=deterministic)
        h_BxD = jnp.tanh(_dense(cfg, cfg.hidden_size, "dense")(h_BxD))
        h_BxD = dropout(h_BxD, deterministic=deterministic)
        return _dense(cfg, cfg.num_labels, "out_proj")(h_BxD)


class BertForSequenceClassification(nn.Module):
    """Encoder + HF's classification head for the config's family.

    BERT: ``bert`` (with pooler) -> dropout -> ``classifier`` Dense. RoBERTa: ``roberta`` (no pooler) ->
    ``classifier/{dense,out_proj}`` on the <s> token.
    """

    config: BertConfig
    jgoat_hooks = ("bottleneck",)  # not a field: see BertModel

    @nn.compact
    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask_BxT: jax.Array | None = None,
        token_type_ids_BxT: jax.Array | None = None,
        position_ids_BxT: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Classifies a batch of sequences.

        Args:
          input_ids_BxT, attention_mask_BxT, token_type_ids_BxT, position_ids_BxT, deterministic: as
            :meth:`BertModel.__call__`.

        Returns:
          logits ``[B, C]`` in the compute dtype.

        Example::

          logits_BxC = model.apply({"params": params}, ids_BxT, mask_BxT)
        """
        cfg = self.config
        is_bert = cfg.model_type == "bert"
        out = BertModel(cfg, add_pooling_layer=is_bert, name=cfg.base_model_prefix)(
            input_ids_BxT,
            attention_mask_BxT,
            token_type_ids_BxT,
            position_ids_BxT,
            deterministic=deterministic,
        )
        if not is_bert:
            return RobertaClassificationHead(cfg, name="classifier")(out.last_hidden_state, deterministic=deterministic)
        pooled_BxD = nn.Dropout(cfg.head_dropout)(out.pooler_output, deterministic=deterministic)
        return _dense(cfg, cfg.num_labels, "classifier")(pooled_BxD)
