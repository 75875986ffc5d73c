"""Architecture of the Llama (2, 3.x) / Mistral / Qwen2 decoders: :class:`LlamaConfig`, read from HF ``config.json``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jgoat import hooks
from jgoat.models.attention import check_attention_impl
from jgoat.models.common import ACTIVATIONS

DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2")
DECODER_TASKS = ("causal-lm",)
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
IGNORE_INDEX = -100

# Values HF's config classes use when a key is absent from config.json.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 4096, "max_position_embeddings": 4096 * 32},
    "qwen2": {"vocab_size": 151936, "max_position_embeddings": 32768, "qkv_bias": True},
}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def _freeze(mapping: Mapping[str, Any] | Sequence | None) -> tuple[tuple[str, Any], ...] | None:
    if mapping is None:
        return None
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama / Mistral / Qwen2 decoder (field names and defaults follow HF's ``LlamaConfig``).

    Attributes:
      num_key_value_heads: KV heads for grouped-query attention (None: as many as query heads).
      head_dim: per-head size (None: ``hidden_size // num_attention_heads``; Mistral-Nemo style configs set it).
      rope_theta: RoPE base.
      rope_scaling: RoPE scaling parameters (HF ``rope_scaling`` / ``rope_parameters`` without ``rope_theta``),
        e.g. ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}``; None or type "default" is plain RoPE. Types: "default",
        "linear", "llama3"; anything else is a ValueError. Stored as a sorted tuple of items (hashable).
      qkv_bias / o_bias / mlp_bias: biases of q/k/v, o_proj and the MLP (Llama ``attention_bias`` sets q/k/v/o;
        Qwen2 has q/k/v bias only).
      tie_word_embeddings: the LM head reuses ``embed_tokens`` (Qwen2.5 small models, Llama 3.2 1B/3B).
      sliding_window: Mistral / Qwen2 sliding-window attention. Not implemented: a forward pass whose key length
        (sequence, or KV cache) exceeds the window raises (within it, the window changes nothing).
      attention_dropout: dropout on attention probabilities when ``deterministic=False``.
      attention_impl: ``"xla"``, ``"cudnn"`` or None (auto: cuDNN on GPU for bf16/fp16 and a supported head size,
        XLA elsewhere); see :mod:`jgoat.models.attention`.
      dtype: compute dtype; param_dtype: dtype of freshly initialised parameters. Attention scores, softmax,
        RMSNorm statistics and RoPE angles are always computed in float32.
      scan_layers: run the layers under ``nn.scan`` (params stacked on a leading layer axis) or unrolled
        (``layers_{i}``).
      remat_policy: None (no rematerialisation) or a name in :data:`REMAT_POLICIES` ("full" recomputes the whole
        layer, "dots" saves matmul outputs, ...); applied per layer in training (not in KV-cache decoding).
      moe_experts: 0 for the dense MLP; E > 0 replaces every MLP by :class:`LlamaMoeMLP`, E SwiGLU experts with a
        top-``moe_top_k`` router (the upcycled full-FT MoE baseline of GOAT's Table 7).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    attention_impl: str | None = None
    initializer_range: float = 0.02
    model_type: str = "llama"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat_policy: str | None = None
    moe_experts: int = 0
    moe_top_k: int = 2

    hook_layout: ClassVar[str] = hooks.DECODER  # sizes for prefix / bottleneck adapters (jgoat.hooks.DecoderSizes)

    def __post_init__(self):
        check_attention_impl(self.attention_impl)
        if self.model_type not in DECODER_MODEL_TYPES:
            raise ValueError(
                f"Unsupported model_type {self.model_type!r}; supported: {', '.join(DECODER_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"Unknown remat_policy {self.remat_policy!r}; supported: None, {', '.join(REMAT_POLICIES)}"
            )
        if self.moe_experts < 0 or (self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts):
            raise ValueError(f"moe_experts must be >= 0 and moe_top_k in [1, moe_experts], got moe_experts="
                             f"{self.moe_experts}, moe_top_k={self.moe_top_k}")
        if self.moe_experts and self.mlp_bias:
            raise ValueError("the MoE MLP (moe_experts > 0) has no biases; set mlp_bias=False")
        object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        rope = self.rope_parameters
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            raise ValueError(
                f"Unsupported rope type {rope['rope_type']!r} (rope_scaling={rope}); supported: {', '.join(ROPE_TYPES)}"
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported (only 1.0)")
        if rope.get("rope_type") in ("linear", "llama3") and "factor" not in rope:
            raise ValueError(f"rope type {rope['rope_type']!r} needs a 'factor' in rope_scaling, got {rope}")
        if rope.get("rope_type") == "llama3":
            absent = [k for k in LLAMA3_KEYS if k not in rope]
            if absent:
                raise ValueError(f"rope type 'llama3' needs {', '.join(absent)} in rope_scaling, got {rope}")

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """``rope_scaling`` as a dict with ``rope_type`` (HF's older ``type`` key is accepted)."""
        rope = dict(self.rope_scaling or ())
        if "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type", "default")
        return rope

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Builds a config from a HF ``config.json`` dict (Llama, Mistral or Qwen2 family).

        Reads both spellings of RoPE settings: transformers<5 (``rope_theta`` + ``rope_scaling``) and
        transformers 5 (``rope_parameters`` holding ``rope_theta`` and ``rope_type``).

        Args:
          hf: the parsed ``config.json``; unknown keys are ignored.
          **overrides: field values that win over ``hf`` (e.g. ``dtype``, ``param_dtype``, ``scan_layers``,
            ``remat_policy``); None values are ignored.

        Returns:
          The frozen config.

        Raises:
          ValueError: unsupported ``model_type``, rope type, or per-layer (nested) RoPE parameters.

        Example::

          cfg = LlamaConfig.from_hf_dict(json.load(open("config.json")), dtype=jnp.bfloat16)
        """
        model_type = overrides.get("model_type", hf.get("model_type", "llama"))
        if model_type not in DECODER_MODEL_TYPES:
            raise ValueError(f"Unsupported model_type {model_type!r}; supported: {', '.join(DECODER_MODEL_TYPES)}")
        skip = {"dtype", "param_dtype", "scan_layers", "remat_policy", "rope_scaling", "rope_theta", "model_type",
                "qkv_bias", "o_bias", "sliding_window", "attention_impl"}
        names = {f.name for f in dataclasses.fields(cls)} - skip
        values = {**_FAMILY_DEFAULTS[model_type], **{k: v for k, v in hf.items() if k in names and v is not None}}
        if hf.get("attention_bias"):  # Llama: one flag for q/k/v/o
            values.update(qkv_bias=True, o_bias=True)
        window = hf.get("sliding_window", values.pop("sliding_window", None))
        if model_type == "qwen2":  # only layers marked "sliding_attention" use it, and only when enabled
            sliding_layers = "sliding_attention" in (hf.get("layer_types") or ())
            if not hf.get("use_sliding_window", False) and not sliding_layers:
                window = None
        values["sliding_window"] = window
        rope: dict[str, Any] = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        if any(isinstance(v, Mapping) for v in rope.values()):
            raise ValueError(f"Per-layer-type RoPE parameters are not supported: {rope}")
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        values["rope_theta"] = float(theta)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        rope.setdefault("rope_type", "default")
        if rope["rope_type"] == "llama3":
            rope.setdefault("original_max_position_embeddings", values.get("max_position_embeddings", 2048))
        values["rope_scaling"] = None if rope == {"rope_type": "default"} else rope
        values.update({k: v for k, v in overrides.items() if v is not None and k != "model_type"})
        values["model_type"] = model_type
        return cls(**values)
