"""The BERT / RoBERTa encoder family, by concern: :mod:`.config` (:class:`BertConfig`), :mod:`.modules` (linen) and
:mod:`.loader` (HF checkpoints; key map :func:`jgoat.models.hf.hf_key`). Every public name of those is importable
from here."""

from jgoat.models.bert.config import SUPPORTED_MODEL_TYPES, BertConfig
from jgoat.models.bert.loader import TASKS, load_encoder
from jgoat.models.bert.modules import (
    BertAttention,
    BertEmbeddings,
    BertEncoder,
    BertForSequenceClassification,
    BertIntermediate,
    BertLayer,
    BertModel,
    BertModelOutput,
    BertPooler,
    BertSelfAttention,
    BertSelfOutput,
    RobertaClassificationHead,
    attention_bias,
    position_ids_from_input_ids,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TASKS",
    "BertAttention",
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertForSequenceClassification",
    "BertIntermediate",
    "BertLayer",
    "BertModel",
    "BertModelOutput",
    "BertPooler",
    "BertSelfAttention",
    "BertSelfOutput",
    "RobertaClassificationHead",
    "attention_bias",
    "load_encoder",
    "position_ids_from_input_ids",
]
