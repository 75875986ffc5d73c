"""Hook points of jgoat's own models: where prompt tuning, prefix tuning and bottleneck adapters enter the graph.

These methods change the model graph, so the linear interceptor (``jgoat.apply``) cannot add them: jgoat's models
read their params at explicit hook points instead. This module is the one contract between the two sides:

  * the models (:mod:`jgoat.models`) import it and call :func:`prompt_and_prefix` (the decoder's embeddings and
    attention) and :func:`bottleneck_output` (a sub-layer's output), and declare the hook points they have in a class
    attribute ``jgoat_hooks`` (a subset of :data:`HOOK_POINTS`);
  * the adapters (``jgoat.adapters.prompt`` / ``bottleneck``) implement them: they write params in the layout read
    here (:data:`PROMPT_KEY`, :data:`PREFIX_KEY`, :data:`BOTTLENECK_KEY`), and size them from a model config through
    the :class:`DecoderSizes` / :class:`EncoderSizes` protocols (a config's ``hook_layout`` says which one it is),
    never importing a model.

Models never import adapters and adapters never import models; both import this module (which imports neither).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

from jgoat.core import matmul

PROMPT_KEY = "jgoat_prompt"
PREFIX_KEY = "jgoat_prefix"
BOTTLENECK_KEY = "jgoat_bottleneck"
HOOK_POINTS = ("prompt", "prefix", "bottleneck")
# Values of a model config's ``hook_layout``: which sizes protocol it follows and where its sub-layers sit.
ENCODER, DECODER = "encoder", "decoder"
# The bottleneck's non-linearity, named by the inner dict of its params (swish: Houlsby, relu: Pfeiffer).
BOTTLENECK_ACTIVATIONS = {"swish": jax.nn.silu, "relu": jax.nn.relu}


class DecoderSizes(Protocol):
    """What prefix tuning and decoder bottleneck adapters need of a decoder's config (``LlamaConfig`` has it)."""

    hook_layout: ClassVar[str]  # DECODER
    hidden_size: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int


class EncoderSizes(Protocol):
    """What encoder bottleneck adapters need of an encoder's config (``BertConfig`` has it)."""

    hook_layout: ClassVar[str]  # ENCODER
    hidden_size: int
    num_hidden_layers: int

    @property
    def base_model_prefix(self) -> str: ...


def hook_layout(model_config: Any) -> str | None:
    """:data:`ENCODER`, :data:`DECODER`, or None for a config of a model without hook points."""
    return getattr(type(model_config), "hook_layout", None)


def bottleneck_delta(node: Mapping[str, jax.Array], h_BxTxD: jax.Array, activation: str) -> jax.Array:
    """``a(h) = φ(h Down + b_down) Up + b_up``, returned in h's dtype.

    Dtype policy: ``AdapterConfig.compute_dtype="auto"`` (the bottleneck's params carry no static knob): both
    matmuls take their operands in h's dtype with float32 accumulation; biases and φ are float32. A float32 model
    computes exactly as with float32 operands throughout.
    """
    dtype = h_BxTxD.dtype
    lead = (1,) * (h_BxTxD.ndim - 1)  # explicit broadcasting of the biases over the token dims

    def bias(name):
        return node[name].astype(jnp.float32).reshape(*lead, -1)

    z = BOTTLENECK_ACTIVATIONS[activation](matmul(h_BxTxD, node["down_kernel"], dtype) + bias("down_bias"))
    a = matmul(z, node["up_kernel"], dtype) + bias("up_bias")
    return a.astype(dtype)


def bottleneck_output(module: Any, h_BxTxD: jax.Array) -> jax.Array:
    """Hook point of a sub-layer's output (BERT's ``BertSelfOutput``, the decoder's ``self_attn`` / ``mlp``), before
    the residual add: ``h + a(h)`` when the module's params hold a bottleneck adapter (``jgoat.add_bottleneck``),
    else h unchanged."""
    if not module.has_variable("params", BOTTLENECK_KEY):
        return h_BxTxD
    entry = module.get_variable("params", BOTTLENECK_KEY)
    for activation, node in entry.items():
        if activation not in BOTTLENECK_ACTIVATIONS:
            raise ValueError(f"{BOTTLENECK_KEY} at '{'/'.join(module.path)}' has unknown activation {activation!r}; "
                             f"known: {sorted(BOTTLENECK_ACTIVATIONS)}")
        h_BxTxD = h_BxTxD + bottleneck_delta(node, h_BxTxD, activation)
    return h_BxTxD


def prefix_key_values(node: Mapping, sizes: DecoderSizes) -> jax.Array:
    """The prefix keys and values ``[L, 2, p, K, H]`` (float32) of a ``jgoat_prefix`` node.

    peft's layout: the flat ``[p, L·2·K·H]`` matrix is viewed as ``[p, L·2, K, H]``; entry ``2i`` is layer i's keys,
    ``2i + 1`` its values. With ``w1`` (reparameterisation) the embedding first goes through
    ``Linear(d_kv, h) -> tanh -> Linear(h, L·2·d_kv)``.
    """
    L, K, H = sizes.num_hidden_layers, sizes.num_key_value_heads, sizes.head_dim
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in node.items() if hasattr(v, "shape")}  # jnp math, even eagerly
    e = f32["embedding"]
    if "w1" in f32:
        e = jnp.tanh(e @ f32["w1"] + f32["b1"][None, :])
        e = e @ f32["w2"] + f32["b2"][None, :]
    p = e.shape[0]
    if e.shape[1] != L * 2 * K * H:
        raise ValueError(f"jgoat_prefix produces {e.shape[1]} values per virtual token, the model needs "
                         f"L·2·K·H = {L * 2 * K * H}")
    return e.reshape(p, L, 2, K, H).transpose(1, 2, 0, 3, 4)


def prompt_and_prefix(module: Any, sizes: DecoderSizes) -> tuple[jax.Array | None, jax.Array | None]:
    """Hook point of a decoder (``jgoat.models.LlamaModel``): (prompt ``[p, D]`` or None, prefix ``[L, 2, p, K, H]``
    or None), read from the module's own params (``model/jgoat_prompt``, ``model/jgoat_prefix``)."""
    prompt = module.get_variable("params", PROMPT_KEY) if module.has_variable("params", PROMPT_KEY) else None
    prefix = module.get_variable("params", PREFIX_KEY) if module.has_variable("params", PREFIX_KEY) else None
    prompt_PxD = None if prompt is None else prompt["embedding"]
    prefix_Lx2xPxKxH = None if prefix is None else prefix_key_values(prefix, sizes)
    return prompt_PxD, prefix_Lx2xPxKxH


def num_virtual_tokens(params: Mapping) -> int:
    """p of the prompt-tuning entry ``model/jgoat_prompt`` of decoder params (0 without prompt tuning): the extra
    KV-cache slots generation needs."""
    model_dict = params.get("model") if isinstance(params, Mapping) else None
    node = model_dict.get(PROMPT_KEY) if isinstance(model_dict, Mapping) else None
    return 0 if node is None else int(node["embedding"].shape[0])
