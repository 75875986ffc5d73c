"""Architectures of the vision family: :class:`CLIPVisionConfig` (CLIP's vision tower) and :class:`ViTConfig`, read
from HF ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jgoat.models.attention import check_attention_impl
from jgoat.models.common import ACTIVATIONS

VISION_MODEL_TYPES = ("vit", "clip", "clip_vision_model")
VISION_TASKS = ("image-classification", "base")



def _as_int_size(value: Any, name: str) -> int:
    """HF allows ``image_size`` / ``patch_size`` as an int or a square [n, n]; jgoat supports square only."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"Only square {name} is supported, got {value!r}")
        value = value[0]
    return int(value)


def _config_values(cls, hf: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    skip = {"dtype", "param_dtype", "remat", "num_labels", "attention_impl"}
    names = {f.name for f in dataclasses.fields(cls)} - skip
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
    ``attention_impl`` picks the attention kernel (``"xla"``, ``"cudnn"`` or None: auto, see
    :mod:`jgoat.models.attention`).
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
    attention_impl: str | None = None

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

    ``pooler_output_size`` None means ``hidden_size``; ``dtype``, ``param_dtype``, ``remat``, ``num_labels`` and
    ``attention_impl`` as in :class:`CLIPVisionConfig`.
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
    attention_impl: str | None = None

    model_type = "vit"

    def __post_init__(self):
        _check_architecture(self)
        if self.pooler_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported pooler_act {self.pooler_act!r}; supported: {sorted(ACTIVATIONS)}")

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
    check_attention_impl(cfg.attention_impl)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"Unsupported hidden_act {cfg.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
    if cfg.patch_size > cfg.image_size:
        raise ValueError(f"patch_size {cfg.patch_size} exceeds image_size {cfg.image_size}")
