"""Architecture of the BERT / RoBERTa encoders: :class:`BertConfig`, read from HF ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from jgoat import hooks
from jgoat.models.attention import check_attention_impl
from jgoat.models.common import ACTIVATIONS

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
# Values HF's config classes use when a key is absent from config.json (BERT's, unless overridden per family).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": {},
    "roberta": {"vocab_size": 50265, "pad_token_id": 1},
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT or RoBERTa encoder (field names and defaults follow HF's ``BertConfig``).

    ``dtype`` is the compute dtype, ``param_dtype`` the dtype of freshly initialised parameters; ``remat``
    rematerialises each encoder layer in the backward pass (same parameter tree, less activation memory);
    ``attention_impl`` picks the attention kernel (``"xla"``, ``"cudnn"`` or None: auto, see
    :mod:`jgoat.models.attention`).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"
    num_labels: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    hook_layout: ClassVar[str] = hooks.ENCODER  # sizes for bottleneck adapters (jgoat.hooks.EncoderSizes)

    def __post_init__(self):
        check_attention_impl(self.attention_impl)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def base_model_prefix(self) -> str:
        """Name of the encoder inside a task model (``bert`` or ``roberta``), as in HF."""
        return self.model_type

    @property
    def head_dropout(self) -> float:
        """Dropout rate of the classification head (HF: ``classifier_dropout`` or ``hidden_dropout_prob``)."""
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from a HF ``config.json`` dict.

        Args:
          hf: the parsed ``config.json``. Unknown keys are ignored; ``num_labels`` falls back to
            ``len(id2label)`` and then to 2, as in HF.
          **overrides: field values that win over ``hf`` (e.g. ``num_labels``, ``dtype``, ``param_dtype``);
            None values are ignored.

        Returns:
          The frozen config.

        Example::

          cfg = BertConfig.from_hf_dict(json.load(open("config.json")), dtype=jnp.bfloat16)
        """
        model_type = overrides.get("model_type", hf.get("model_type", "bert"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"Unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"Only absolute position embeddings are supported, got {hf['position_embedding_type']!r}")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("Decoder / cross-attention BERT configs are not supported (encoder only)")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "remat", "attention_impl"}
        values = {**_FAMILY_DEFAULTS[model_type], **{k: v for k, v in hf.items() if k in names}}
        if "num_labels" not in values and hf.get("id2label"):
            values["num_labels"] = len(hf["id2label"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["model_type"] = model_type
        return cls(**values)
