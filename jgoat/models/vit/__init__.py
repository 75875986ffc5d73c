"""The vision family (CLIP vision tower, ViT), by concern: :mod:`.config`, :mod:`.modules` (linen), :mod:`.loader` (HF
checkpoints; key map :func:`jgoat.models.hf.vision_hf_key`) and :mod:`.image` (preprocessing). Every public name of
those is importable from here."""

from jgoat.models.hf import vision_hf_key
from jgoat.models.vit.config import VISION_MODEL_TYPES, VISION_TASKS, CLIPVisionConfig, VisionConfig, ViTConfig
from jgoat.models.vit.image import preprocess, processor_settings, read_preprocessor_config
from jgoat.models.vit.loader import is_vision_checkpoint, load_vision_model
from jgoat.models.vit.modules import (
    CLIPMLP,
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPForImageClassification,
    CLIPVisionEmbeddings,
    CLIPVisionModel,
    Encoder,
    VisionModelOutput,
    ViTAttention,
    ViTDenseDropout,
    ViTEmbeddings,
    ViTForImageClassification,
    ViTIntermediate,
    ViTLayer,
    ViTModel,
    ViTPatchEmbeddings,
    ViTPooler,
    ViTSelfAttention,
)

__all__ = [
    "VISION_MODEL_TYPES",
    "VISION_TASKS",
    "CLIPAttention",
    "CLIPEncoderLayer",
    "CLIPForImageClassification",
    "CLIPMLP",
    "CLIPVisionConfig",
    "CLIPVisionEmbeddings",
    "CLIPVisionModel",
    "Encoder",
    "ViTAttention",
    "ViTConfig",
    "ViTDenseDropout",
    "ViTEmbeddings",
    "ViTForImageClassification",
    "ViTIntermediate",
    "ViTLayer",
    "ViTModel",
    "ViTPatchEmbeddings",
    "ViTPooler",
    "ViTSelfAttention",
    "VisionConfig",
    "VisionModelOutput",
    "is_vision_checkpoint",
    "load_vision_model",
    "preprocess",
    "processor_settings",
    "read_preprocessor_config",
    "vision_hf_key",
]
