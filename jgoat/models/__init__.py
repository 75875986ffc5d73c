"""jgoat's own linen models, loaded straight from Hugging Face checkpoint folders (no torch).

One package per family (``bert``, ``llama``, ``vit``: config, modules, loader; generation for the decoders), one HF
I/O module with every family's key maps (:mod:`jgoat.models.hf`), ``from_pretrained`` (:mod:`jgoat.models.auto`)
and the writers (:mod:`jgoat.models.io`). Models import :mod:`jgoat.hooks` for the graph-changing adapters, never
``jgoat.adapters``.
"""

from jgoat.models.auto import from_pretrained, read_config
from jgoat.models.bert import (
    SUPPORTED_MODEL_TYPES,
    BertConfig,
    BertEncoder,
    BertForSequenceClassification,
    BertLayer,
    BertModel,
    BertModelOutput,
    RobertaClassificationHead,
    attention_bias,
    position_ids_from_input_ids,
)
from jgoat.models.formats import UnsafeCheckpointError, load_flax_msgpack, load_torch_bin
from jgoat.models.gguf import convert_gguf, smollm2_path
from jgoat.models.hf import LoadingInfo, hf_key, load_tokenizer, minilm_path
from jgoat.models.io import save_pretrained
from jgoat.models.llama import (
    DECODER_MODEL_TYPES,
    REMAT_POLICIES,
    CausalLMOutput,
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaModelOutput,
    causal_lm_loss,
    generate,
    init_cache,
    position_ids_from_mask,
    stack_layers,
    unstack_layers,
)
from jgoat.models.vit import (
    VISION_MODEL_TYPES,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    VisionModelOutput,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    load_vision_model,
    preprocess,
    processor_settings,
    read_preprocessor_config,
    vision_hf_key,
)

__all__ = [
    # vision (jgoat.models.vit)
    "VISION_MODEL_TYPES",
    "CLIPForImageClassification",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "ViTConfig",
    "ViTForImageClassification",
    "ViTModel",
    "VisionModelOutput",
    "load_vision_model",
    "preprocess",
    "processor_settings",
    "read_preprocessor_config",
    "vision_hf_key",
    # checkpoint files (jgoat.models.io, jgoat.models.formats)
    "UnsafeCheckpointError",
    "load_flax_msgpack",
    "load_torch_bin",
    "save_pretrained",
    # text
    "DECODER_MODEL_TYPES",
    "REMAT_POLICIES",
    "SUPPORTED_MODEL_TYPES",
    "BertConfig",
    "BertEncoder",
    "BertForSequenceClassification",
    "BertLayer",
    "BertModel",
    "BertModelOutput",
    "CausalLMOutput",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaModel",
    "LlamaModelOutput",
    "LoadingInfo",
    "RobertaClassificationHead",
    "attention_bias",
    "causal_lm_loss",
    "from_pretrained",
    "generate",
    "hf_key",
    "init_cache",
    "load_tokenizer",
    "minilm_path",
    "smollm2_path",
    "convert_gguf",
    "position_ids_from_input_ids",
    "position_ids_from_mask",
    "read_config",
    "stack_layers",
    "unstack_layers",
]
