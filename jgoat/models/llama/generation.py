"""KV-cache generation for jgoat's decoders (:class:`~jgoat.models.llama.LlamaForCausalLM`): :func:`init_cache` and
:func:`generate`, greedy or sampled, under jit, with adapters live (``jgoat.apply``).

Generation runs the model through ``jgoat.apply`` (so wrapped params work), hence this module sits above
``jgoat.apply``; the config and modules (:mod:`jgoat.models.llama.config`, :mod:`jgoat.models.llama.modules`) do not.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgoat import hooks
from jgoat.apply import apply as apply_with_adapters
from jgoat.models.llama.config import LlamaConfig
from jgoat.models.llama.modules import LlamaForCausalLM, check_key_length


@functools.cache
def _cache_shapes(config: LlamaConfig, batch_size: int, max_length: int):
    ids = jnp.zeros((batch_size, max_length), jnp.int32)
    model = LlamaForCausalLM(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids), decode=True)["cache"])


def init_cache(model: LlamaForCausalLM, batch_size: int, max_length: int) -> dict[str, Any]:
    """A zero KV cache (``'cache'`` collection) for ``batch_size`` rows and ``max_length`` slots.

    Nothing is computed to get the shapes (``jax.eval_shape``). Cached keys/values are ``[L, B, S, K, H]`` when
    scanned (``[B, S, K, H]`` per ``layers_{i}`` otherwise), in the compute dtype; ``model/index`` counts the
    slots filled.

    Example::

      cache = init_cache(model, 4, 128)
      out, state = model.apply({"params": p, "cache": cache}, ids_4xT, mask_4x128, decode=True, mutable=["cache"])
    """
    shapes = _cache_shapes(model.config, batch_size, max_length)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _next_token(logits_BxV, key, greedy, temperature, top_k: int | None):
    """``argmax(logits / temperature + Gumbel noise)``, a sample of ``softmax(logits / temperature)`` (the Gumbel-max
    trick, as ``jax.random.categorical``); ``greedy`` (traced) drops the noise, so both modes share one compile."""
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    noise_BxV = jax.random.gumbel(key, logits_BxV.shape, jnp.float32)
    return jnp.argmax(jnp.where(greedy, logits_BxV, logits_BxV + noise_BxV), axis=-1).astype(jnp.int32)


@functools.cache
def _generation_fns(config: LlamaConfig, top_k: int | None):
    """(prefill, decode), jitted once per (config, top_k); shapes are jit's business, and greedy / temperature /
    EOS / pad are traced, so changing them does not recompile."""
    model = LlamaForCausalLM(config)
    run = apply_with_adapters(model.apply)

    def forward(params, cache, ids_BxT, mask_BxS, prompt_in_cache):
        out, _, state = run(
            {"params": params, "cache": cache}, ids_BxT, mask_BxS, decode=True, prompt_in_cache=prompt_in_cache,
            only_last_logits=True, mutable=["cache"],
        )
        return out.logits[:, -1], state["cache"]

    def prefill(params, cache, ids_BxT, mask_BxS, key, greedy, temperature):
        logits_BxV, cache = forward(params, cache, ids_BxT, mask_BxS, False)  # prompt tuning: caches the virtual ones
        return _next_token(logits_BxV, jax.random.fold_in(key, 0), greedy, temperature, top_k), cache

    def decode(params, cache, first_B, mask_BxS, key, greedy, temperature, eos_E, pad_id, max_new_tokens):
        B = first_B.shape[0]
        tokens_BxM = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)

        def is_eos(tok_B):
            return jnp.any(tok_B[:, None] == eos_E[None, :], axis=1)

        def cond(state):
            i, _, _, done_B = state
            return (i < max_new_tokens) & ~jnp.all(done_B)

        def body(state):
            i, tokens_BxM, cache, done_B = state
            prev_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxM, i - 1, 1, axis=1)
            logits_BxV, cache = forward(params, cache, prev_Bx1, mask_BxS, True)
            tok_B = _next_token(logits_BxV, jax.random.fold_in(key, i), greedy, temperature, top_k)
            tok_B = jnp.where(done_B, pad_id, tok_B)
            tokens_BxM = jax.lax.dynamic_update_slice_in_dim(tokens_BxM, tok_B[:, None], i, axis=1)
            return i + 1, tokens_BxM, cache, done_B | is_eos(tok_B)

        state = (jnp.ones((), jnp.int32), tokens_BxM, cache, is_eos(first_B))
        _, tokens_BxM, _, _ = jax.lax.while_loop(cond, body, state)
        return tokens_BxM

    # The prefill's cache is donated (updated in place); the decode loop's cache never leaves it.
    return jax.jit(prefill, donate_argnums=(1,)), jax.jit(decode, static_argnums=(9,))


def generate(
    model: LlamaForCausalLM,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Greedy or sampled generation with a preallocated KV cache, under jit.

    One jitted prefill over the (left-padded) prompts fills cache slots ``0..T-1``; one jitted
    ``lax.while_loop`` then decodes a token per step into a cache of ``T + max_new_tokens`` slots, stopping early
    once every row has produced an EOS. Adapters in ``params`` (``jgoat.wrap``) are live (``jgoat.apply``), and so
    are prompt tuning (the p virtual tokens are prefilled into p extra cache slots, as peft's generate) and prefix
    tuning (``jgoat.add_prompt`` / ``jgoat.add_prefix``).

    Args:
      model: a :class:`LlamaForCausalLM` (only its ``config`` is used).
      params: its params (optionally wrapped with adapters).
      input_ids: ``[B, T]`` prompts, LEFT-padded (the next token is read from the last column).
      attention_mask: ``[B, T]`` 1 on real tokens; None means no padding.
      max_new_tokens: tokens to generate per row.
      greedy: argmax decoding (HF ``do_sample=False``); False samples from ``softmax(logits / temperature)``.
      temperature: sampling temperature (> 0).
      top_k: sample among the k most likely tokens only (None: the whole vocabulary).
      key: PRNG key, required when sampling (step i uses ``fold_in(key, i)``).
      eos_token_id: id(s) that finish a row; later tokens of that row are ``pad_token_id``.
      pad_token_id: filler after EOS (default: the first EOS id, as HF, else 0).

    Returns:
      int32 ``[B, T + max_new_tokens]``: the prompts followed by the generated tokens.

    Example::

      out_BxN = generate(model, params, ids_BxT, mask_BxT, max_new_tokens=256, eos_token_id=tok.eos_token_id)
      texts = tok.batch_decode(out_BxN[:, ids_BxT.shape[1]:], skip_special_tokens=True)
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy:
        if key is None:
            raise ValueError("sampling (greedy=False) needs a PRNG key")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and not 0 < top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
    eos_ids = [] if eos_token_id is None else np.atleast_1d(np.asarray(eos_token_id)).astype(int).tolist()
    pad_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    eos_E = jnp.asarray(eos_ids or [-1], jnp.int32)  # -1: no token is EOS
    input_ids = jnp.asarray(input_ids, jnp.int32)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    mask_BxS = jnp.concatenate(
        [jnp.asarray(attention_mask, jnp.int32), jnp.ones((B, max_new_tokens), jnp.int32)], axis=1
    )
    n_virtual = hooks.num_virtual_tokens(params)  # prompt tuning: p extra cache slots
    check_key_length(model.config, n_virtual + T + max_new_tokens)
    prefill, decode = _generation_fns(model.config, None if greedy else top_k)
    key = jax.random.key(0) if key is None else key
    greedy_ = jnp.asarray(bool(greedy))
    temperature_ = jnp.asarray(1.0 if greedy else temperature, jnp.float32)
    cache = init_cache(model, B, n_virtual + T + max_new_tokens)
    first_B, cache = prefill(params, cache, input_ids, mask_BxS, key, greedy_, temperature_)
    new_BxM = decode(
        params, cache, first_B, mask_BxS, key, greedy_, temperature_, eos_E, jnp.asarray(pad_id, jnp.int32),
        max_new_tokens,
    )
    return jnp.concatenate([input_ids, new_BxM], axis=1)
