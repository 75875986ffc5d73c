"""CLIP vision tower and ViT image classifiers in ``flax.linen``.

Module names mirror Hugging Face's torch modules, so parameter paths read like HF state-dict keys::

    CLIP (CLIPVisionModel / CLIPForImageClassification, model_type "clip_vision_model" or "clip"):
    vision_model/embeddings/class_embedding                        <- vision_model.embeddings.class_embedding
    vision_model/embeddings/patch_embedding/kernel  [P, P, C, D]   <- ...patch_embedding.weight [D, C, P, P]
    vision_model/embeddings/position_embedding/embedding           <- ...position_embedding.weight
    vision_model/pre_layrnorm (HF's spelling), .../post_layernorm
    vision_model/encoder/layers_0/self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel,bias}
    vision_model/encoder/layers_0/{layer_norm1,layer_norm2}, .../mlp/{fc1,fc2}
    classifier                                                     (mean of the patch tokens, as HF)

    ViT (ViTModel / ViTForImageClassification, model_type "vit"):
    vit/embeddings/{cls_token, position_embeddings, patch_embeddings/projection/{kernel,bias}}
    vit/encoder/layer_0/attention/attention/{query,key,value}, .../attention/output/dense
    vit/encoder/layer_0/{intermediate/dense, output/dense, layernorm_before, layernorm_after}
    vit/layernorm, classifier (on the [CLS] token); pooler/dense in the bare ViTModel

Every linear layer is a plain ``nn.Dense`` (kernel ``[in, out]``) so that adapter interceptors see it; the patch
embedding is an ``nn.Conv`` (kernel ``[P, P, C, D]``), which ``targets="all-linear"`` leaves alone, like HF PEFT.
Images are channels-last: ``pixel_values_BxHxWxC`` (HF's torch models take ``[B, C, H, W]``; transpose with
``x.transpose(0, 2, 3, 1)``). :func:`preprocess` returns that layout.

Shapes in names: B batch, H/W image height/width, C channels, P patch size, G patches per side, T tokens
(1 + G*G), D hidden size, N heads, K head size, F intermediate size, L labels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jgoat.models import attention
from jgoat.models.common import ACTIVATIONS
from jgoat.models.vit.config import CLIPVisionConfig, VisionConfig, ViTConfig


def _dense(cfg: VisionConfig, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


def _layer_norm(cfg: VisionConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance, like torch, rather than flax's default E[x^2] - E[x]^2.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        use_fast_variance=False,
        name=name,
    )


def _patch_conv(cfg: VisionConfig, use_bias: bool, name: str) -> nn.Conv:
    """HF's ``Conv2d(C, D, kernel=P, stride=P)`` on channels-last images: kernel ``[P, P, C, D]``."""
    P = cfg.patch_size
    return nn.Conv(
        cfg.hidden_size,
        (P, P),
        strides=(P, P),
        padding="VALID",
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


def _check_pixels(cfg: VisionConfig, pixel_values_BxHxWxC: jax.Array) -> None:
    if pixel_values_BxHxWxC.ndim != 4:
        raise ValueError(f"pixel_values must be [B, H, W, C] (channels last), got shape {pixel_values_BxHxWxC.shape}")
    _, H, W, C = pixel_values_BxHxWxC.shape
    if C != cfg.num_channels:
        raise ValueError(
            f"pixel_values have {C} channels in the last axis, the model expects {cfg.num_channels} "
            "(jgoat takes channels-last [B, H, W, C]; HF's torch models take [B, C, H, W])"
        )
    if (H, W) != (cfg.image_size, cfg.image_size):
        raise ValueError(
            f"Input image size ({H}*{W}) doesn't match model ({cfg.image_size}*{cfg.image_size}); "
            "position-embedding interpolation is not supported"
        )


def _patches(conv: nn.Conv, pixel_values_BxHxWxC: jax.Array) -> jax.Array:
    """Patch embeddings ``[B, G*G, D]`` in row-major patch order (HF: ``flatten(2).transpose(1, 2)``)."""
    x_BxGxGxD = conv(pixel_values_BxHxWxC)
    B, G1, G2, D = x_BxGxGxD.shape
    return x_BxGxGxD.reshape(B, G1 * G2, D)


def _attention(cfg: VisionConfig, q_BxTxD, k_BxTxD, v_BxTxD, rate: float, *, deterministic: bool):
    """Unmasked multi-head attention (:func:`jgoat.models.attention.dot_product_attention`), dropout ``rate`` on the
    probabilities when not ``deterministic``."""
    B, T, D = q_BxTxD.shape
    N = cfg.num_attention_heads
    q_BxTxNxH, k_BxTxNxH, v_BxTxNxH = (x.reshape(B, T, N, D // N) for x in (q_BxTxD, k_BxTxD, v_BxTxD))
    dropout = None
    if rate > 0 and not deterministic:
        dropout = functools.partial(nn.Dropout(rate), deterministic=False)
    out_BxTxNxH = attention.dot_product_attention(
        q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, None, dtype=cfg.dtype, impl=cfg.attention_impl, dropout=dropout
    )
    return out_BxTxNxH.reshape(B, T, D)


class VisionModelOutput(NamedTuple):
    """Outputs of :class:`CLIPVisionModel` and :class:`ViTModel` (as HF's ``BaseModelOutputWithPooling``)."""

    last_hidden_state: jax.Array  # [B, T, D]; CLIP: before post_layernorm, ViT: after the final layernorm
    pooler_output: jax.Array | None  # [B, D]; CLIP: post_layernorm([CLS]), ViT: pooler or None without one


# ----------------------------------------------------------------------------------------------------------- CLIP


class CLIPVisionEmbeddings(nn.Module):
    """``class_embedding`` + ``patch_embedding`` (conv, no bias) + ``position_embedding``."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values_BxHxWxC):
        cfg = self.config
        D = cfg.hidden_size
        cls_D = self.param("class_embedding", nn.initializers.normal(D**-0.5), (D,), cfg.param_dtype)
        x_BxGGxD = _patches(_patch_conv(cfg, False, "patch_embedding"), pixel_values_BxHxWxC)
        B = x_BxGGxD.shape[0]
        cls_Bx1xD = jnp.broadcast_to(cls_D.astype(x_BxGGxD.dtype)[None, None, :], (B, 1, D))
        x_BxTxD = jnp.concatenate([cls_Bx1xD, x_BxGGxD], axis=1)
        position = nn.Embed(
            cfg.num_patches + 1,
            D,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            name="position_embedding",
        )
        pos_1xTxD = position(jnp.arange(cfg.num_patches + 1)[None, :])
        return x_BxTxD + pos_1xTxD


class CLIPAttention(nn.Module):
    """HF ``self_attn``: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (all with bias)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x_BxTxD, *, deterministic: bool):
        cfg = self.config
        D = cfg.hidden_size
        q, k, v = (_dense(cfg, D, name)(x_BxTxD) for name in ("q_proj", "k_proj", "v_proj"))
        a_BxTxD = _attention(cfg, q, k, v, cfg.attention_dropout, deterministic=deterministic)
        return _dense(cfg, D, "out_proj")(a_BxTxD)


class CLIPMLP(nn.Module):
    """HF ``mlp``: ``fc1``, activation (quick_gelu for CLIP), ``fc2``."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        h_BxTxF = ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "fc1")(x_BxTxD))
        return _dense(cfg, cfg.hidden_size, "fc2")(h_BxTxF)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN layer: ``x + self_attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool = True):
        cfg = self.config
        h_BxTxD = _layer_norm(cfg, "layer_norm1")(x_BxTxD)
        x_BxTxD = x_BxTxD + CLIPAttention(cfg, name="self_attn")(h_BxTxD, deterministic=deterministic)
        return x_BxTxD + CLIPMLP(cfg, name="mlp")(_layer_norm(cfg, "layer_norm2")(x_BxTxD))


class Encoder(nn.Module):
    """Stack of ``{layer_name}_{i}`` layers (CLIP: ``layers_i``, ViT: ``layer_i``), optionally rematerialised."""

    config: VisionConfig
    layer: type[nn.Module]
    layer_name: str

    @nn.compact
    def __call__(self, x_BxTxD, *, deterministic: bool):
        cfg = self.config
        layer_cls = nn.remat(self.layer, static_argnums=(2,)) if cfg.remat else self.layer
        for i in range(cfg.num_hidden_layers):
            x_BxTxD = layer_cls(cfg, name=f"{self.layer_name}_{i}")(x_BxTxD, deterministic)
        return x_BxTxD


class CLIPVisionModel(nn.Module):
    """The CLIP vision tower (HF ``CLIPVisionModel``): embeddings, ``pre_layrnorm``, encoder, ``post_layernorm``."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values_BxHxWxC: jax.Array, *, deterministic: bool = True) -> VisionModelOutput:
        """Encodes a batch of preprocessed images.

        Args:
          pixel_values_BxHxWxC: normalised images, channels last (see :func:`preprocess`).
          deterministic: disables attention dropout; when False a ``'dropout'`` rng is needed.

        Returns:
          ``VisionModelOutput(last_hidden_state [B, T, D] (no post_layernorm, as HF), pooler_output [B, D] =
          post_layernorm of the [CLS] token)``.
        """
        cfg = self.config
        _check_pixels(cfg, pixel_values_BxHxWxC)
        x_BxTxD = CLIPVisionEmbeddings(cfg, name="embeddings")(pixel_values_BxHxWxC.astype(cfg.dtype))
        x_BxTxD = _layer_norm(cfg, "pre_layrnorm")(x_BxTxD)
        x_BxTxD = Encoder(cfg, CLIPEncoderLayer, "layers", name="encoder")(x_BxTxD, deterministic=deterministic)
        pooled_BxD = _layer_norm(cfg, "post_layernorm")(x_BxTxD[:, 0])
        return VisionModelOutput(x_BxTxD, pooled_BxD)


class CLIPForImageClassification(nn.Module):
    """HF ``CLIPForImageClassification``: ``vision_model``, then ``classifier`` on the MEAN of the patch tokens
    of ``last_hidden_state`` (the [CLS] token and ``post_layernorm`` are not used, exactly as in HF)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values_BxHxWxC: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Classifies a batch of preprocessed images.

        Args:
          pixel_values_BxHxWxC: normalised images, channels last.
          deterministic: disables dropout.

        Returns:
          logits ``[B, L]`` in the compute dtype.

        Example::

          logits_BxL = model.apply({"params": params}, preprocess(images_BxHxWx3, processor_config))
        """
        cfg = self.config
        out = CLIPVisionModel(cfg, name="vision_model")(pixel_values_BxHxWxC, deterministic=deterministic)
        pooled_BxD = jnp.mean(out.last_hidden_state[:, 1:], axis=1)
        head = nn.Dense(
            cfg.num_labels,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=nn.initializers.normal(cfg.head_init_std),
            name="classifier",
        )
        return head(pooled_BxD)


# ------------------------------------------------------------------------------------------------------------ ViT


class ViTPatchEmbeddings(nn.Module):
    """HF ``patch_embeddings``: ``projection`` conv (with bias)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values_BxHxWxC):
        return _patches(_patch_conv(self.config, True, "projection"), pixel_values_BxHxWxC)


class ViTEmbeddings(nn.Module):
    """``cls_token`` [1, 1, D], ``patch_embeddings``, ``position_embeddings`` [1, T, D], dropout."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values_BxHxWxC, *, deterministic: bool):
        cfg = self.config
        D, T = cfg.hidden_size, cfg.num_patches + 1
        init = nn.initializers.truncated_normal(cfg.initializer_range)
        cls_1x1xD = self.param("cls_token", init, (1, 1, D), cfg.param_dtype)
        x_BxGGxD = ViTPatchEmbeddings(cfg, name="patch_embeddings")(pixel_values_BxHxWxC)
        B = x_BxGGxD.shape[0]
        x_BxTxD = jnp.concatenate([jnp.broadcast_to(cls_1x1xD.astype(x_BxGGxD.dtype), (B, 1, D)), x_BxGGxD], axis=1)
        pos_1xTxD = self.param("position_embeddings", init, (1, T, D), cfg.param_dtype)
        x_BxTxD = x_BxTxD + pos_1xTxD.astype(x_BxTxD.dtype)
        return nn.Dropout(cfg.hidden_dropout_prob)(x_BxTxD, deterministic=deterministic)


class ViTSelfAttention(nn.Module):
    """HF ``attention.attention``: ``query`` / ``key`` / ``value`` (bias iff ``qkv_bias``)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BxTxD, *, deterministic: bool):
        cfg = self.config
        q, k, v = (_dense(cfg, cfg.hidden_size, n, use_bias=cfg.qkv_bias)(x_BxTxD) for n in ("query", "key", "value"))
        return _attention(cfg, q, k, v, cfg.attention_probs_dropout_prob, deterministic=deterministic)


class ViTDenseDropout(nn.Module):
    """``dense`` + dropout: HF ``attention.output`` and ``output`` (the residual is added by the layer)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, h_BxTxF, *, deterministic: bool):
        cfg = self.config
        y_BxTxD = _dense(cfg, cfg.hidden_size, "dense")(h_BxTxF)
        return nn.Dropout(cfg.hidden_dropout_prob)(y_BxTxD, deterministic=deterministic)


class ViTAttention(nn.Module):
    """HF ``attention``: ``attention`` (self-attention) and ``output`` (projection + dropout)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BxTxD, *, deterministic: bool):
        a_BxTxD = ViTSelfAttention(self.config, name="attention")(x_BxTxD, deterministic=deterministic)
        return ViTDenseDropout(self.config, name="output")(a_BxTxD, deterministic=deterministic)


class ViTIntermediate(nn.Module):
    """HF ``intermediate``: ``dense`` to the intermediate size, then the activation."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        return ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "dense")(x_BxTxD))


class ViTLayer(nn.Module):
    """Pre-LN layer: ``x + attention(layernorm_before(x))``, then ``x + output(intermediate(layernorm_after(x)))``."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool = True):
        cfg = self.config
        h_BxTxD = _layer_norm(cfg, "layernorm_before")(x_BxTxD)
        x_BxTxD = x_BxTxD + ViTAttention(cfg, name="attention")(h_BxTxD, deterministic=deterministic)
        h_BxTxF = ViTIntermediate(cfg, name="intermediate")(_layer_norm(cfg, "layernorm_after")(x_BxTxD))
        return x_BxTxD + ViTDenseDropout(cfg, name="output")(h_BxTxF, deterministic=deterministic)


class ViTPooler(nn.Module):
    """HF ``pooler``: ``dense`` (to ``pooler_output_size``) + ``pooler_act`` on the [CLS] token."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        size = cfg.pooler_output_size or cfg.hidden_size
        return ACTIVATIONS[cfg.pooler_act](_dense(cfg, size, "dense")(x_BxTxD[:, 0]))


class ViTModel(nn.Module):
    """The bare ViT (HF ``ViTModel``): embeddings, encoder, final ``layernorm``, optional ``pooler``.

    Attributes:
      config: the architecture.
      add_pooling_layer: whether to build ``pooler`` (HF default True; the classifier omits it).
    """

    config: ViTConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, pixel_values_BxHxWxC: jax.Array, *, deterministic: bool = True) -> VisionModelOutput:
        """Encodes a batch of preprocessed images.

        Args:
          pixel_values_BxHxWxC: normalised images, channels last (see :func:`preprocess`).
          deterministic: disables dropout; when False a ``'dropout'`` rng is needed.

        Returns:
          ``VisionModelOutput(last_hidden_state [B, T, D] (after ``layernorm``), pooler_output [B, D] or None)``.
        """
        cfg = self.config
        _check_pixels(cfg, pixel_values_BxHxWxC)
        embeddings = ViTEmbeddings(cfg, name="embeddings")
        x_BxTxD = embeddings(pixel_values_BxHxWxC.astype(cfg.dtype), deterministic=deterministic)
        x_BxTxD = Encoder(cfg, ViTLayer, "layer", name="encoder")(x_BxTxD, deterministic=deterministic)
        x_BxTxD = _layer_norm(cfg, "layernorm")(x_BxTxD)
        pooled_BxD = ViTPooler(cfg, name="pooler")(x_BxTxD) if self.add_pooling_layer else None
        return VisionModelOutput(x_BxTxD, pooled_BxD)


class ViTForImageClassification(nn.Module):
    """HF ``ViTForImageClassification``: ``vit`` (no pooler), then ``classifier`` on the [CLS] token."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values_BxHxWxC: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Classifies a batch of preprocessed images.

        Args:
          pixel_values_BxHxWxC: normalised images, channels last.
          deterministic: disables dropout; when False a ``'dropout'`` rng is needed.

        Returns:
          logits ``[B, L]`` in the compute dtype.

        Example::

          logits_BxL = model.apply({"params": params}, preprocess(images_BxHxWx3, processor_config))
        """
        cfg = self.config
        out = ViTModel(cfg, add_pooling_layer=False, name="vit")(pixel_values_BxHxWxC, deterministic=deterministic)
        head = nn.Dense(
            cfg.num_labels,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=nn.initializers.normal(cfg.head_init_std),
            name="classifier",
        )
        return head(out.last_hidden_state[:, 0])
