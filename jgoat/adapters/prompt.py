"""Prompt tuning and prefix tuning (HF PEFT ``PromptTuningConfig`` / ``PrefixTuningConfig``) for jgoat's decoders.

Both change the model graph, so they are read by explicit hook points of jgoat's own Llama / Mistral / Qwen2
(:class:`jgoat.models.LlamaModel`, via :mod:`jgoat.hooks`), never by the linear interceptor. The new, trainable
leaves live in the params tree beside the frozen base, under the decoder's ``model`` dict::

    model/jgoat_prompt/embedding  [p, D]                      prompt tuning: virtual-token embeddings
    model/jgoat_prefix/embedding  [p, L*2*K*H]                prefix tuning without reparameterisation
    model/jgoat_prefix/{embedding [p, d], w1 [d, h], b1 [h], w2 [h, L*2*K*H], b2}   with ``prefix_projection``

Each of those dicts holds a ``jgoat: TrainModule()`` marker, so ``jgoat.split`` / ``jgoat.trainable_mask`` treat
exactly these leaves as trainable and the base as frozen (``jgoat.summary`` lists them under "modules_to_save").
Leaves are never named ``kernel``, so ``jgoat.wrap(..., targets="all-linear")`` never adapts them.

Semantics (peft 0.21 on a transformers Llama, checked by tests/test_prompt_prefix_bottleneck.py):
  * prompt tuning: ``P`` is prepended to the token embeddings; the attention mask gets p ones in front; virtual
    tokens take positions ``0..p-1`` and real tokens ``p..`` (HF's positions for an inputs_embeds of length p + T).
    jgoat returns outputs (logits, hidden states) for the T real positions only, so labels stay ``[B, T]``.
  * prefix tuning: per layer, p key and p value vectors (GQA: K kv heads, d_kv = H·K; peft's ``token_dim``) are put
    in front of the keys / values, with no RoPE applied to them and mask ones; as HF (the prefix is a
    ``past_key_values`` of length p) the real tokens' RoPE positions are offset by p.
  * reparameterisation (``prefix_projection=True``): ``Emb(p, d_kv) -> Linear(d_kv, h) -> tanh ->
    Linear(h, L·2·d_kv)``, h = ``encoder_hidden_size`` (default d_kv, as peft after its GQA adjustment).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jgoat.core import ADAPTER_KEY, TrainModule, check_fields
from jgoat.hooks import (
    DECODER,
    PREFIX_KEY,
    PROMPT_KEY,
    DecoderSizes,
    hook_layout,
    num_virtual_tokens,
    prefix_key_values,
)
from jgoat.hooks import prompt_and_prefix as read_hooks

PROMPT_INITS = ("random", "sample_vocab", "text")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning (Lester et al., 2021), as peft's ``PromptTuningConfig``.

    Attributes:
      num_virtual_tokens: p, the number of trainable virtual tokens prepended to every sequence.
      init: "random" (N(0, 1), peft's RANDOM), "sample_vocab" (rows of the embedding table at uniformly sampled
        token ids, peft's SAMPLE_VOCAB) or "text" (embeddings of ``init_text``'s tokens, truncated or repeated to
        p tokens, peft's TEXT; needs a tokenizer).
      init_text: the text for ``init="text"``.
    """

    num_virtual_tokens: int
    init: str = "random"
    init_text: str | None = None

    def __post_init__(self):
        check_fields(self)  # num_virtual_tokens (and encoder_hidden_size) positive ints
        if self.init not in PROMPT_INITS:
            raise ValueError(f"init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs a non-empty init_text")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"init_text is only used with init='text' (got init={self.init!r})")


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang, 2021), as peft's ``PrefixTuningConfig``.

    Attributes:
      num_virtual_tokens: p, the prefix length (per layer, p keys and p values).
      prefix_projection: reparameterise the prefix through an MLP (peft's ``prefix_projection``).
      encoder_hidden_size: the MLP's hidden size h (default: d_kv = head_dim · kv_heads, as peft).
    """

    num_virtual_tokens: int
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    def __post_init__(self):
        check_fields(self)  # num_virtual_tokens (and encoder_hidden_size) positive ints
        if self.encoder_hidden_size is not None:
            if not self.prefix_projection:
                raise ValueError("encoder_hidden_size is only used with prefix_projection=True")


def require_hooks(params: Any, hook: str, model: Any = None) -> None:
    """Raise a ValueError unless ``params`` (and ``model``, if given) belong to a jgoat model with ``hook``.

    Hook-bearing jgoat models declare ``jgoat_hooks`` (a class attribute): Llama / Mistral / Qwen2 have "prompt",
    "prefix" and "bottleneck", BERT / RoBERTa have "bottleneck". Foreign linen models have none: these methods
    change the model graph, so there is nothing an interceptor could do for them.
    """
    if model is not None and hook not in getattr(type(model), "jgoat_hooks", ()):
        raise ValueError(
            f"{type(model).__name__} has no '{hook}' hook point: {hook} tuning changes the model graph and works only "
            "with jgoat's own models that declare it (jgoat.models.LlamaForCausalLM / LlamaModel for prompt and "
            "prefix; those and BertModel / BertForSequenceClassification for bottleneck adapters)"
        )
    if hook in ("prompt", "prefix"):
        model_dict = params.get("model") if isinstance(params, Mapping) else None
        ok = (
            isinstance(model_dict, Mapping)
            and isinstance(model_dict.get("embed_tokens"), Mapping)
            and ("layers" in model_dict or "layers_0" in model_dict)
        )
        if not ok:
            keys = sorted(params)[:8] if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(
                f"params do not look like a jgoat decoder (model/embed_tokens, model/layers...; got top-level keys "
                f"{keys}): {hook} tuning needs the explicit hook points of jgoat.models.LlamaForCausalLM (Llama, "
                "Mistral, Qwen2); a foreign model has none. Pass the 'params' collection of a jgoat decoder"
            )
        for existing in (PROMPT_KEY, PREFIX_KEY):
            if existing in model_dict:
                raise ValueError(f"params already hold '{existing}': add one prompt-learning method at most, once")


def _with_model_entry(params: Mapping, name: str, node: dict) -> dict:
    params = dict(params)
    params["model"] = {**params["model"], name: {**node, ADAPTER_KEY: TrainModule()}}
    return params


def add_prompt(params: Mapping, cfg: PromptTuningConfig, *, key: jax.Array, tokenizer: Any = None,
               model: Any = None) -> dict:
    """Add trainable virtual-token embeddings ``model/jgoat_prompt/embedding [p, D]`` (float32) to decoder params.

    Args:
      params: the 'params' collection of a jgoat decoder (``jgoat.models.from_pretrained``), possibly wrapped.
      cfg: the prompt-tuning config.
      key: PRNG key for the init.
      tokenizer: a HF tokenizer (callable returning ``{"input_ids": [...]}``), needed for ``init="text"``.
      model: optional: the model, checked to have the "prompt" hook point.

    Returns:
      A new params tree; run it with the unchanged ``model.apply`` (or ``jgoat.apply``).

    Raises:
      ValueError: params (or model) of a model without the hook point, or a missing tokenizer for init="text".

    Example::

      params = jgoat.add_prompt(params, jgoat.PromptTuningConfig(20, init="sample_vocab"), key=key)
      trainable, frozen = jgoat.split(params)
    """
    require_hooks(params, "prompt", model)
    table_VxD = params["model"]["embed_tokens"]["embedding"]
    V, D = table_VxD.shape
    p = cfg.num_virtual_tokens
    if cfg.init == "random":
        prompt_PxD = jax.random.normal(key, (p, D), jnp.float32)
    elif cfg.init == "sample_vocab":
        ids = jax.random.randint(key, (p,), 0, V)
        prompt_PxD = jnp.asarray(table_VxD)[ids].astype(jnp.float32)
    else:
        if tokenizer is None:
            raise ValueError("init='text' needs a tokenizer (tokenizer=...)")
        ids = list(tokenizer(cfg.init_text)["input_ids"])
        if not ids:
            raise ValueError(f"init_text {cfg.init_text!r} tokenizes to no tokens")
        ids = (ids * math.ceil(p / len(ids)))[:p]  # peft: truncate, or repeat then truncate
        prompt_PxD = jnp.asarray(table_VxD)[jnp.asarray(ids)].astype(jnp.float32)
    return _with_model_entry(params, PROMPT_KEY, {"embedding": prompt_PxD})


def add_prefix(params: Mapping, model_config: DecoderSizes, cfg: PrefixTuningConfig, *, key: jax.Array,
               model: Any = None) -> dict:
    """Add trainable per-layer key/value prefixes ``model/jgoat_prefix/...`` (float32) to decoder params.

    Initialised as peft: embedding N(0, 1); MLP linears torch's default U(±1/sqrt(fan_in)) for weights and biases.

    Args:
      params: the 'params' collection of a jgoat decoder.
      model_config: its :class:`jgoat.models.LlamaConfig`, or any config with the decoder sizes
        (:class:`jgoat.hooks.DecoderSizes`: layers, kv heads, head size).
      cfg: the prefix-tuning config.
      key: PRNG key.
      model: optional: the model, checked to have the "prefix" hook point.

    Example::

      params = jgoat.add_prefix(params, config, jgoat.PrefixTuningConfig(10, prefix_projection=True), key=key)
    """
    require_hooks(params, "prefix", model)
    if hook_layout(model_config) != DECODER:
        raise ValueError(f"prefix tuning needs a jgoat LlamaConfig (the decoder's hook points), got "
                         f"{type(model_config).__name__}")
    L, K, H = model_config.num_hidden_layers, model_config.num_key_value_heads, model_config.head_dim
    d_kv, p = K * H, cfg.num_virtual_tokens
    out_dim = L * 2 * d_kv
    if not cfg.prefix_projection:
        node = {"embedding": jax.random.normal(key, (p, out_dim), jnp.float32)}
    else:
        h = cfg.encoder_hidden_size or d_kv
        k_emb, k_w1, k_b1, k_w2, k_b2 = jax.random.split(key, 5)

        def uniform(k, fan_in, shape):
            bound = 1.0 / math.sqrt(fan_in)
            return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

        node = {
            "embedding": jax.random.normal(k_emb, (p, d_kv), jnp.float32),
            "w1": uniform(k_w1, d_kv, (d_kv, h)),
            "b1": uniform(k_b1, d_kv, (h,)),
            "w2": uniform(k_w2, h, (h, out_dim)),
            "b2": uniform(k_b2, h, (out_dim,)),
        }
    return _with_model_entry(params, PREFIX_KEY, node)


__all__ = [
    "PREFIX_KEY",
    "PROMPT_INITS",
    "PROMPT_KEY",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "add_prefix",
    "add_prompt",
    "num_virtual_tokens",
    "prefix_key_values",
    "read_hooks",
    "require_hooks",
]
