"""CLIP vision tower and ViT image classifiers in ``flax.linen``, their HF checkpoint loader and image preprocessing.

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

import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jgoat.models.bert import _ACTIVATIONS as _BERT_ACTIVATIONS
from jgoat.models.hf import LoadingInfo, _checkpoint_files, read_matching

logger = logging.getLogger(__name__)

VISION_MODEL_TYPES = ("vit", "clip", "clip_vision_model")
VISION_TASKS = ("image-classification", "base")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    **_BERT_ACTIVATIONS,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # HF QuickGELUActivation (CLIP)
    "tanh": jnp.tanh,
}


def _as_int_size(value: Any, name: str) -> int:
    """HF allows ``image_size`` / ``patch_size`` as an int or a square [n, n]; jgoat supports square only."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"Only square {name} is supported, got {value!r}")
        value = value[0]
    return int(value)


def _config_values(cls, hf: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "remat", "num_labels"}
    values = {k: v for k, v in hf.items() if k in names}
    for key in ("image_size", "patch_size"):
        if key in values:
            values[key] = _as_int_size(values[key], key)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def _num_labels(hf: dict[str, Any]) -> int:
    """HF: ``num_labels`` if given, else ``len(id2label)``, else 2."""
    if "num_labels" in hf:
        return int(hf["num_labels"])
    return len(hf["id2label"]) if hf.get("id2label") else 2


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a CLIP vision tower (field names and defaults follow HF's ``CLIPVisionConfig``: ViT-B/32).

    ``dtype`` is the compute dtype, ``param_dtype`` the dtype of freshly initialised parameters; ``remat``
    rematerialises each encoder layer in the backward pass. ``num_labels`` sizes the classification head.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    num_labels: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    model_type = "clip"  # class constant: the family, for messages and the loader

    def __post_init__(self):
        _check_architecture(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_init_std(self) -> float:
        """HF's init of ``CLIPForImageClassification.classifier``: normal(hidden_size**-0.5 * factor)."""
        return self.hidden_size**-0.5 * self.initializer_factor

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> CLIPVisionConfig:
        """Builds a config from a HF ``config.json`` dict of model_type ``clip`` or ``clip_vision_model``.

        Args:
          hf: the parsed ``config.json``. For ``clip`` (a full CLIP or ``CLIPForImageClassification``) the
            architecture comes from ``vision_config`` and the labels from the top level. Unknown keys are ignored.
          **overrides: field values that win over ``hf`` (e.g. ``num_labels``, ``dtype``); None values are ignored.

        Returns:
          The frozen config.

        Example::

          cfg = CLIPVisionConfig.from_hf_dict(json.load(open("config.json")), num_labels=10)
        """
        model_type = hf.get("model_type")
        if model_type not in ("clip", "clip_vision_model"):
            raise ValueError(f"Not a CLIP config: model_type {model_type!r}")
        arch = (hf.get("vision_config") or {}) if model_type == "clip" else hf
        values = _config_values(cls, arch, overrides)
        values.setdefault("num_labels", _num_labels(hf))
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT (field names and defaults follow HF's ``ViTConfig``: ViT-B/16).

    ``pooler_output_size`` None means ``hidden_size``; ``dtype``, ``param_dtype``, ``remat`` and ``num_labels`` as
    in :class:`CLIPVisionConfig`.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    num_labels: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    model_type = "vit"

    def __post_init__(self):
        _check_architecture(self)
        if self.pooler_act not in _ACTIVATIONS:
            raise ValueError(f"Unsupported pooler_act {self.pooler_act!r}; supported: {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_init_std(self) -> float:
        """HF's init of ``ViTForImageClassification.classifier``: normal(initializer_range)."""
        return self.initializer_range

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> ViTConfig:
        """Builds a config from a HF ``config.json`` dict of model_type ``vit``.

        Args:
          hf: the parsed ``config.json``; unknown keys are ignored.
          **overrides: field values that win over ``hf``; None values are ignored.

        Returns:
          The frozen config.

        Example::

          cfg = ViTConfig.from_hf_dict(json.load(open("config.json")), dtype=jnp.bfloat16)
        """
        if hf.get("model_type") != "vit":
            raise ValueError(f"Not a ViT config: model_type {hf.get('model_type')!r}")
        values = _config_values(cls, hf, overrides)
        values.setdefault("num_labels", _num_labels(hf))
        return cls(**values)


VisionConfig = CLIPVisionConfig | ViTConfig


def _check_architecture(cfg: VisionConfig) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads")
    if cfg.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"Unsupported hidden_act {cfg.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
    if cfg.patch_size > cfg.image_size:
        raise ValueError(f"patch_size {cfg.patch_size} exceeds image_size {cfg.image_size}")


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


def _attention(q_BxTxD, k_BxTxD, v_BxTxD, num_heads: int, dropout: nn.Dropout, *, deterministic: bool):
    """Unmasked multi-head attention; scores and softmax in fp32, probabilities back in the compute dtype."""
    B, T, D = q_BxTxD.shape
    N, K = num_heads, D // num_heads
    q_BxTxNxK, k_BxTxNxK, v_BxTxNxK = (x.reshape(B, T, N, K) for x in (q_BxTxD, k_BxTxD, v_BxTxD))
    scores_BxNxTxT = jnp.einsum("btnk,bsnk->bnts", q_BxTxNxK, k_BxTxNxK).astype(jnp.float32) * (K**-0.5)
    probs_BxNxTxT = jax.nn.softmax(scores_BxNxTxT, axis=-1).astype(v_BxTxD.dtype)
    probs_BxNxTxT = dropout(probs_BxNxTxT, deterministic=deterministic)
    return jnp.einsum("bnts,bsnk->btnk", probs_BxNxTxT, v_BxTxNxK).reshape(B, T, D)


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
        a_BxTxD = _attention(
            q, k, v, cfg.num_attention_heads, nn.Dropout(cfg.attention_dropout), deterministic=deterministic
        )
        return _dense(cfg, D, "out_proj")(a_BxTxD)


class CLIPMLP(nn.Module):
    """HF ``mlp``: ``fc1``, activation (quick_gelu for CLIP), ``fc2``."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        h_BxTxF = _ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "fc1")(x_BxTxD))
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
        dropout = nn.Dropout(cfg.attention_probs_dropout_prob)
        return _attention(q, k, v, cfg.num_attention_heads, dropout, deterministic=deterministic)


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
        return _ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "dense")(x_BxTxD))


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
        return _ACTIVATIONS[cfg.pooler_act](_dense(cfg, size, "dense")(x_BxTxD[:, 0]))


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


# --------------------------------------------------------------------------------------------------------- loader

_PREFIX = {"clip": "vision_model", "clip_vision_model": "vision_model", "vit": "vit"}
# Non-persistent torch buffers that older checkpoints still contain: reported in LoadingInfo.unused, not logged.
_BUFFER_KEYS = ("embeddings.position_ids",)
_LAYER_NAME = re.compile(r"^(layers?)_(\d+)$")  # Flax "layers_3" / "layer_3" <-> HF "layers.3" / "layer.3"
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def vision_hf_key(flax_path: tuple[str, ...]) -> str:
    """Maps a Flax parameter path (without the ``vision_model`` / ``vit`` level) to its HF key.

    Args:
      flax_path: e.g. ``("encoder", "layers_0", "self_attn", "q_proj", "kernel")``.

    Returns:
      The HF key, e.g. ``"encoder.layers.0.self_attn.q_proj.weight"``; raw parameters keep their name
      (``embeddings.class_embedding``, ``embeddings.cls_token``, ``embeddings.position_embeddings``).
    """
    *modules, leaf = flax_path
    modules = [_LAYER_NAME.sub(r"\1.\2", m) for m in modules]
    return ".".join([*modules, _LEAF_NAMES.get(leaf, leaf)])


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """Shape of the HF tensor for a Flax leaf: Dense kernels ``[in, out]`` -> ``[out, in]``; conv kernels
    ``[P, P, C, D]`` -> ``[D, C, P, P]``; everything else unchanged."""
    if leaf == "kernel" and len(flax_shape) == 2:
        return flax_shape[::-1]
    if leaf == "kernel" and len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    return flax_shape


def _from_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # [D, C, P, P] -> [P, P, C, D]
    return array


def is_vision_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the folder's ``config.json`` has a model_type in :data:`VISION_MODEL_TYPES`."""
    config = pathlib.Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in VISION_MODEL_TYPES


def load_vision_model(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    key: jax.Array | None = None,
    output_loading_info: bool = False,
) -> tuple[nn.Module, dict[str, Any], VisionConfig] | tuple[nn.Module, dict[str, Any], VisionConfig, LoadingInfo]:
    """Builds a jgoat CLIP vision / ViT model and its params from a HF checkpoint folder (no torch).

    ``jgoat.models.from_pretrained`` calls this for model_type ``vit``, ``clip`` and ``clip_vision_model``.
    Tensors are streamed one at a time from ``model.safetensors`` (or a sharded index), transposed to the Flax
    layout and cast to ``param_dtype``. For a full ``clip`` checkpoint (``CLIPModel``) only the ``vision_model.*``
    (and ``classifier.*``) keys are read; the text tower is reported in ``LoadingInfo.unused`` and otherwise
    ignored. Checkpoint keys match with or without the ``vision_model.`` / ``vit.`` prefix.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json``).
      task: ``"image-classification"`` (default: :class:`CLIPForImageClassification` /
        :class:`ViTForImageClassification`, params ``{vision_model|vit, classifier}``) or ``"base"``
        (:class:`CLIPVisionModel` / :class:`ViTModel` with pooler, params without the top level).
      num_labels: classifier size; default from the config (``num_labels``, ``len(id2label)``, else 2).
      dtype: compute dtype, and the dtype parameters are cast to unless ``param_dtype`` is given.
      param_dtype: parameter dtype (default ``dtype``).
      key: PRNG key for head / pooler parameters missing from the checkpoint (default ``jax.random.key(0)``).
      output_loading_info: also return a :class:`~jgoat.models.hf.LoadingInfo` (HF names, without prefix).

    Returns:
      ``(model, params, config)`` (plus ``LoadingInfo`` if asked); run with
      ``model.apply({"params": params}, pixel_values_BxHxWxC)``.

    Raises:
      ValueError: unsupported model_type / task, or tensors missing / of the wrong shape (all are listed; no
        partially loaded model is returned).

    Example::

      model, params, cfg = load_vision_model(folder, num_labels=10)  # new head initialised, reported
      logits_BxL = model.apply({"params": params}, preprocess(images, read_preprocessor_config(folder)))
    """
    folder = pathlib.Path(path)
    hf = json.loads((folder / "config.json").read_text())
    model_type = hf.get("model_type")
    if model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"Unsupported model_type {model_type!r}; supported: {', '.join(VISION_MODEL_TYPES)}")
    task = "image-classification" if task is None else task
    if task not in VISION_TASKS:
        raise ValueError(f"Unknown task {task!r} for {model_type}; supported: {', '.join(VISION_TASKS)}")
    param_dtype = dtype if param_dtype is None else param_dtype
    kw = dict(num_labels=num_labels, dtype=dtype, param_dtype=param_dtype)
    config: VisionConfig
    if model_type == "vit":
        config = ViTConfig.from_hf_dict(hf, **kw)
        model = ViTModel(config) if task == "base" else ViTForImageClassification(config)
    else:
        config = CLIPVisionConfig.from_hf_dict(hf, **kw)
        model = CLIPVisionModel(config) if task == "base" else CLIPForImageClassification(config)
    prefix = _PREFIX[model_type]
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), dtype)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))["params"]

    files = _checkpoint_files(folder)
    canonical: dict[str, str] = {}
    ignored = []
    for ck in files:
        if model_type == "clip" and not ck.startswith((prefix + ".", "classifier.")):
            ignored.append(ck)  # text tower, projections, logit_scale of a full CLIP checkpoint
            continue
        name = ck.removeprefix(prefix + ".")
        if name in canonical:
            raise ValueError(f"Checkpoint keys {canonical[name]!r} and {ck!r} both map to {name!r}")
        canonical[name] = ck

    want_shapes = traverse_util.flatten_dict(shapes)
    flat, used, to_init = read_matching(
        files, canonical, want_shapes, lambda p: vision_hf_key(p[1:] if p[0] == prefix else p),
        torch_shape=lambda p, shape: _torch_shape(shape, p[-1]), from_torch=lambda p, a: _from_torch(a, p[-1]),
        param_dtype=param_dtype,
        what=f"{folder} as {model_type} {task} (HF keys, with or without the '{prefix}.' prefix)")

    key = jax.random.key(0) if key is None else key
    for i, (fpath, name) in enumerate(to_init):
        shape_dtype = want_shapes[fpath]
        if fpath[-1] == "kernel":
            std = config.head_init_std if name.startswith("classifier.") else config.initializer_range
            normal = jax.random.normal(jax.random.fold_in(key, i), shape_dtype.shape, jnp.float32)
            flat[fpath] = (std * normal).astype(shape_dtype.dtype)
        else:
            flat[fpath] = jnp.zeros(shape_dtype.shape, shape_dtype.dtype)
    info = LoadingInfo(newly_initialized=[name for _, name in to_init], unused=sorted(set(files) - used))
    if info.newly_initialized:
        logger.warning("Newly initialised (not in %s): %s", folder, ", ".join(info.newly_initialized))
    unused_weights = [k for k in info.unused if k not in ignored and k.removeprefix(prefix + ".") not in _BUFFER_KEYS]
    if unused_weights:
        logger.warning("Unused checkpoint keys in %s: %s", folder, ", ".join(unused_weights))
    if ignored:
        logger.info(
            "Ignored %d non-vision keys (text tower, projections) of the CLIP checkpoint %s", len(ignored), folder
        )
    params = traverse_util.unflatten_dict(flat)
    return (model, params, config, info) if output_loading_info else (model, params, config)


# -------------------------------------------------------------------------------------------------- preprocessing

# Class defaults of HF's image processors (transformers 5: ``CLIPImageProcessor(Pil)``, ``ViTImageProcessor(Pil)``),
# used for keys that preprocessor_config.json leaves out. ``resample`` is a PIL code (2 bilinear, 3 bicubic).
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,
        default_to_square=False,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
    ),
    "ViTImageProcessor": dict(
        do_resize=True,
        size={"height": 224, "width": 224},
        resample=2,
        default_to_square=True,
        do_center_crop=False,
        crop_size=None,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    ),
}
# A config that names no processor class: HF's base defaults (every step off unless the config turns it on).
_GENERIC_DEFAULTS = dict(
    do_resize=False,
    size=None,
    resample=2,
    default_to_square=True,
    do_center_crop=False,
    crop_size=None,
    do_rescale=False,
    rescale_factor=1 / 255,
    do_normalize=False,
    image_mean=None,
    image_std=None,
)


def read_preprocessor_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parses ``preprocessor_config.json`` of a checkpoint folder (as written by HF's image processors).

    Args:
      path: checkpoint folder (or the json file itself).

    Returns:
      The dict, for :func:`preprocess`.
    """
    file = pathlib.Path(path)
    file = file / "preprocessor_config.json" if file.is_dir() else file
    if not file.is_file():
        raise FileNotFoundError(f"No preprocessor_config.json at {file}")
    return json.loads(file.read_text())


def _size_dict(size: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """HF's ``get_size_dict``: legacy ints / (h, w) tuples to a size dict; only the keys jgoat implements."""
    if isinstance(size, int):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict):
        raise ValueError(f"Cannot read {name}={size!r}")
    keys = set(size)
    if keys not in ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}):
        raise ValueError(
            f"{name} keys {sorted(keys)} are not supported; supported: height+width, shortest_edge, "
            "shortest_edge+longest_edge"
        )
    return {k: int(v) for k, v in size.items()}


def processor_settings(processor_config: dict[str, Any]) -> dict[str, Any]:
    """Every preprocessing setting of an HF image-processor config, with the processor class's defaults filled in.

    Args:
      processor_config: a parsed ``preprocessor_config.json``; ``image_processor_type`` (or the legacy
        ``feature_extractor_type``) picks the defaults: CLIPImageProcessor or ViTImageProcessor (also their
        ``Fast`` / ``Pil`` / ``FeatureExtractor`` spellings); absent, HF's base defaults (all steps off).

    Returns:
      ``{do_resize, size, resample, do_center_crop, crop_size, do_rescale, rescale_factor, do_normalize,
      image_mean, image_std}`` with ``size`` / ``crop_size`` as size dicts.

    Raises:
      ValueError: an unknown processor type or an unsupported size specification.
    """
    kind = processor_config.get("image_processor_type") or processor_config.get("feature_extractor_type")
    if kind is None:
        defaults = _GENERIC_DEFAULTS
    else:
        base = kind.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast").removesuffix("Pil")
        if base not in _PROCESSOR_DEFAULTS:
            raise ValueError(f"Unsupported image processor {kind!r}; supported: {', '.join(_PROCESSOR_DEFAULTS)}")
        defaults = _PROCESSOR_DEFAULTS[base]
    s = {k: processor_config[k] if processor_config.get(k) is not None else v for k, v in defaults.items()}
    if s["do_resize"]:
        s["size"] = _size_dict(s["size"], bool(s.pop("default_to_square")), "size")
    else:
        s.pop("default_to_square")
    if s["do_center_crop"]:
        s["crop_size"] = _size_dict(s["crop_size"], True, "crop_size")
        if set(s["crop_size"]) != {"height", "width"}:
            raise ValueError(f"crop_size must have height and width, got {s['crop_size']}")
    if s["do_normalize"] and (s["image_mean"] is None or s["image_std"] is None):
        raise ValueError("do_normalize needs image_mean and image_std")
    return s


def _resize_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """HF's output size (``get_resize_output_image_size`` / ``get_size_with_aspect_ratio``), int truncation included."""
    if "height" in size:
        return size["height"], size["width"]
    target = size["shortest_edge"]
    if "longest_edge" in size:  # get_size_with_aspect_ratio
        max_size = size["longest_edge"]
        raw = None
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * target > max_size:
            raw = max_size * lo / hi
            target = int(round(raw))
        if (height <= width and height == target) or (width <= height and width == target):
            return height, width
        if width < height:
            return (int(raw * height / width) if raw is not None else int(target * height / width)), target
        return target, (int(raw * width / height) if raw is not None else int(target * width / height))
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(target * long / short)
    return (new_long, target) if width <= height else (target, new_long)


def _center_crop(image_HxWxC: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HF's ``center_crop``: top-left at ``(size - crop) // 2``; zero-pads (centred) an image that is too small."""
    h, w = image_HxWxC.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return image_HxWxC[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((new_h, new_w, image_HxWxC.shape[2]), image_HxWxC.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    padded[top_pad : top_pad + h, left_pad : left_pad + w] = image_HxWxC
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def preprocess(images: np.ndarray | Sequence[np.ndarray], processor_config: dict[str, Any]) -> np.ndarray:
    """HF's image-processor pipeline in numpy (+ PIL for resizing), with the same numbers as HF's PIL backend.

    Steps, as ``CLIPImageProcessor`` / ``ViTImageProcessor`` (PIL backend, the one transformers uses without
    torchvision): resize with PIL (shortest edge or height/width; ``resample`` from the config, bicubic for CLIP),
    center crop (zero-padding images that are too small), rescale (``uint8 -> float64 * rescale_factor -> float32``)
    and normalise (``(x - mean) / std`` in float32). PIL is needed only when an image actually changes size.

    Args:
      images: uint8 RGB images, ``[N, H, W, 3]`` or a sequence of ``[H, W, 3]`` arrays of any sizes.
      processor_config: a parsed ``preprocessor_config.json`` (see :func:`read_preprocessor_config` and
        :func:`processor_settings` for the keys and defaults).

    Returns:
      float32 ``[N, H', W', 3]`` channels-last pixel values, the input of jgoat's vision models (HF's
      ``pixel_values`` transposed from ``[N, 3, H', W']``).

    Raises:
      ValueError: non-uint8 / non-RGB images, images that end at different sizes (no crop), or bad settings.
      ModuleNotFoundError: resizing is needed and Pillow is not installed.

    Example::

      pixels_Nx224x224x3 = preprocess(images_uint8, read_preprocessor_config(folder))
    """
    s = processor_settings(processor_config)
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError(f"images must be [N, H, W, 3] or a list of [H, W, 3]; got one array of shape {images.shape}")
    out = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"each image must be uint8 [H, W, 3] (RGB), got {image.dtype} {image.shape}")
        if s["do_resize"]:
            h, w = _resize_output_size(image.shape[0], image.shape[1], s["size"])
            if (h, w) != image.shape[:2]:  # PIL returns an identical copy for an unchanged size
                image = _pil_resize(image, h, w, int(s["resample"]))
        if s["do_center_crop"]:
            image = _center_crop(image, s["crop_size"]["height"], s["crop_size"]["width"])
        if s["do_rescale"]:
            image = (image.astype(np.float64) * s["rescale_factor"]).astype(np.float32)
        if s["do_normalize"]:
            image = image if np.issubdtype(image.dtype, np.floating) else image.astype(np.float32)
            mean = np.asarray(s["image_mean"], image.dtype)
            std = np.asarray(s["image_std"], image.dtype)
            if mean.shape not in ((), (3,)) or std.shape not in ((), (3,)):
                raise ValueError(f"image_mean / image_std must have 1 or 3 values, got {mean.shape} / {std.shape}")
            image = (image - mean) / std
        out.append(image.astype(np.float32))
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
        raise ValueError(
            f"preprocessed images differ in size {sorted(shapes)}: the config needs a crop or a fixed size"
        )
    if not out:
        raise ValueError("no images")
    return np.stack(out)


@functools.cache
def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("Resizing images needs Pillow: pip install pillow", name="PIL") from err
    return Image


def _pil_resize(image_HxWx3: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """PIL resize of a uint8 RGB image, exactly as HF's ``resize`` (PIL takes (width, height))."""
    return np.asarray(_pil().fromarray(image_HxWx3).resize((width, height), resample=resample))
