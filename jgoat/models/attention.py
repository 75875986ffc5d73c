"""Scaled dot-product attention of jgoat's models, through :func:`jax.nn.dot_product_attention`.

One entry point, :func:`dot_product_attention`, used by the Llama / Mistral / Qwen2 decoders, BERT / RoBERTa and
ViT / CLIP. Scores are accumulated and soft-maxed in float32 and the probabilities cast back to the compute dtype
(as every model here did before); masked scores are replaced by a large negative number, so a row whose keys are
all masked (a left-padded query) attends uniformly, as before. Grouped-query attention (K key/value heads < N query
heads) is native: query head n reads key/value head ``n // (N // K)`` (HF's ``repeat_kv``).

Implementations (``attention_impl`` of each model config):

- ``"xla"``: XLA's composition (einsums + softmax); runs everywhere.
- ``"cudnn"``: cuDNN's fused (flash) attention; GPU only, bf16 / fp16 inputs, head size a multiple of 8 up to 128.
- ``None`` (default): ``"cudnn"`` on a GPU backend when the compute dtype is bf16 / fp16 and the head size is
  supported, ``"xla"`` otherwise.

Packed batches (several examples per row, ``segment_ids``) are masked, not cut: :func:`same_segment_mask` ANDed
with the causal / padding mask goes to either implementation as a boolean mask.

Attention dropout (a training-time rate > 0) needs the probabilities themselves, which the fused kernels do not
expose: with an active dropout the scores and probabilities are formed explicitly (the XLA maths, same numerics).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn")


def check_attention_impl(impl: str | None) -> None:
    """Raise a ValueError unless ``impl`` is None, "xla" or "cudnn"."""
    if impl is not None and impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be None (auto) or one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")


def resolve_attention_impl(impl: str | None, dtype: Any, head_dim: int) -> str:
    """The implementation ``impl`` selects: itself when given, else cuDNN on GPU for bf16/fp16 and a supported head
    size (a multiple of 8, at most 128), XLA otherwise."""
    check_attention_impl(impl)
    if impl is not None:
        return impl
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def same_segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """``[B, T, T]`` True where query t and key s lie in the same packed example: equal segment ids, both non-zero
    (0 marks padding). AND it with a causal mask for a packed decoder batch: attention then never crosses examples.

    Args:
      segment_ids_BxT: int ids ``[B, T]``, 1, 2, ... per packed example of a row, 0 on padding.
    """
    seg_BxT = segment_ids_BxT.astype(jnp.int32)
    return (seg_BxT[:, :, None] == seg_BxT[:, None, :]) & (seg_BxT[:, None, :] != 0)


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    keep_Bx1xTxS: jax.Array | None,
    *,
    bias_Bx1xTxS: jax.Array | None = None,
    dtype: Any,
    impl: str | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """``softmax(q kᵀ / sqrt(H) + bias where keep, else -large) v`` per head, ``[B, T, N, H]`` in ``dtype``.

    Args:
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH: queries, keys, values (cast to ``dtype``); N a multiple of K.
      keep_Bx1xTxS: boolean mask ``[B, 1, T, S]`` (True: attend; B and T may be 1 to broadcast), or None
        (attend to everything).
      bias_Bx1xTxS: additive float bias on the scaled scores, same layout as the mask (BERT's padding bias), or
        None.
      dtype: compute dtype of the inputs, probabilities and output.
      impl: "xla", "cudnn" or None (auto, :func:`resolve_attention_impl`).
      dropout: applied to the probabilities ``[B, K, G, T, S]`` when given (training with attention dropout);
        forces the explicit XLA maths.

    Returns:
      ``[B, T, N, H]`` in ``dtype``.
    """
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = (x.astype(dtype) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
    B, T, N, H = q_BxTxNxH.shape
    if dropout is None:
        return jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, bias=bias_Bx1xTxS, mask=keep_Bx1xTxS,
            implementation=resolve_attention_impl(impl, dtype, H),
        )
    K = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    ) * jnp.float32(H**-0.5)
    if bias_Bx1xTxS is not None:
        scores_BxKxGxTxS = scores_BxKxGxTxS + bias_Bx1xTxS[:, :, None].astype(jnp.float32)
    if keep_Bx1xTxS is not None:
        scores_BxKxGxTxS = jnp.where(keep_Bx1xTxS[:, :, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxTxS = dropout(jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(dtype))
    return jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH).reshape(B, T, N, H)
