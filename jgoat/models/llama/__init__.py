"""The Llama (2, 3.x) / Mistral / Qwen2 decoder family, by concern: :mod:`.config` (:class:`LlamaConfig`),
:mod:`.modules` (the linen modules, loss, scanned <-> unrolled params), :mod:`.generation` (KV cache, ``generate``)
and :mod:`.loader` (HF checkpoints; key map :func:`jgoat.models.hf.decoder_hf_key`). Every public name of those is
importable from here."""

from jgoat.models.hf import decoder_hf_key as hf_key
from jgoat.models.llama.config import (
    DECODER_MODEL_TYPES,
    DECODER_TASKS,
    IGNORE_INDEX,
    REMAT_POLICIES,
    ROPE_TYPES,
    LlamaConfig,
)
from jgoat.models.llama.generation import generate, init_cache
from jgoat.models.llama.loader import load_causal_lm
from jgoat.models.llama.modules import (
    CausalLMOutput,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaModelOutput,
    LlamaMoeMLP,
    RMSNorm,
    apply_rope,
    causal_lm_loss,
    check_key_length,
    position_ids_from_mask,
    position_ids_from_segments,
    rope_cos_sin,
    rope_inv_freq,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "DECODER_MODEL_TYPES",
    "DECODER_TASKS",
    "IGNORE_INDEX",
    "REMAT_POLICIES",
    "ROPE_TYPES",
    "CausalLMOutput",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "LlamaModelOutput",
    "LlamaMoeMLP",
    "RMSNorm",
    "apply_rope",
    "causal_lm_loss",
    "check_key_length",
    "generate",
    "hf_key",
    "init_cache",
    "load_causal_lm",
    "position_ids_from_mask",
    "position_ids_from_segments",
    "rope_cos_sin",
    "rope_inv_freq",
    "stack_layers",
    "unstack_layers",
]
