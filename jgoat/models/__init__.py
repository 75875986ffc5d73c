"""jgoat's own linen models, loaded straight from Hugging Face checkpoint folders (no torch)."""

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
from jgoat.models.hf import LoadingInfo, from_pretrained, hf_key, load_tokenizer, minilm_path, read_config

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "BertConfig",
    "BertEncoder",
    "BertForSequenceClassification",
    "BertLayer",
    "BertModel",
    "BertModelOutput",
    "LoadingInfo",
    "RobertaClassificationHead",
    "attention_bias",
    "from_pretrained",
    "hf_key",
    "load_tokenizer",
    "minilm_path",
    "position_ids_from_input_ids",
    "read_config",
]
