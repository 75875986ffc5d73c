"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), as AdapterHub's ``adapters`` (not in peft).

``a(h) = Up(φ(Down(h)))`` with ``Down: D -> D / reduction_factor`` and ``Up`` back to D, applied to a sub-layer's
output h and added to it (the adapter's own residual), before the sub-layer's residual add:

  * Houlsby: after the attention output AND after the feed-forward output, φ = swish (SiLU);
  * Pfeiffer: after the feed-forward output only, φ = ReLU.

Near-identity init: Down / Up kernels truncated-normal (±2σ) with std 1e-2, zero biases, so ``|a(h)|`` is tiny; a
zero Up (kernel and bias) gives ``a(h) = 0`` exactly, so the model is then bit-identical to the base.

Where the adapter sits (x is the sub-layer's input, i.e. its residual):

  * BERT / RoBERTa (post-norm, ``BertSelfOutput``: ``.../attention/output`` and ``.../output`` of every
    ``layer_{i}``): ``out = LN(x + h + a(h))``, h the projected (and dropped-out) output, LN the sub-layer's own
    frozen LayerNorm (METHODS.md).
  * Llama / Mistral / Qwen2 (pre-norm, ``self_attn`` and ``mlp`` of every layer): there is no LayerNorm after the
    residual add, so ``out = x + h + a(h)`` with ``h = self_attn(input_layernorm(x))`` (o_proj's output) or
    ``h = mlp(post_attention_layernorm(x))`` (down_proj's output, or the MoE mixture). This is AdapterHub's Llama
    integration (``attention_adapters`` / ``output_adapters`` on the self_attn / mlp output with no LayerNorm) for
    its Houlsby config ``DoubleSeqBnConfig`` (``residual_before_ln=True``: the adapter's residual is h;
    ``original_ln_after``: then x is added). For its Pfeiffer config ``SeqBnConfig``, AdapterHub's
    ``original_ln_before=True`` (with no LayerNorm to apply) feeds ``x + h`` to the adapter, ``x + h + a(x + h)``;
    jgoat keeps METHODS.md's ``a(h)`` for both placements, as on BERT (where AdapterHub's Pfeiffer reads
    ``LN(x + h)``), so the two placements differ only in sites and φ.

The adapter changes the model graph, so it is read by explicit hook points of jgoat's own models
(:func:`jgoat.hooks.bottleneck_output`, called by those sub-layers on their output). Its params sit beside the
frozen base in that sub-layer's dict::

    .../attention/output/jgoat_bottleneck/{swish|relu}/{down_kernel [D, r], down_bias [r], up_kernel [r, D], up_bias}
    model/layers/{self_attn|mlp}/jgoat_bottleneck/{swish|relu}/{...}    decoder, scanned: [L, ...] leaves
    model/layers_{i}/{self_attn|mlp}/jgoat_bottleneck/{swish|relu}/{...}    decoder, unrolled

The activation is the name of the inner dict (static, so no non-array leaf); that dict holds a
``jgoat: TrainModule()`` marker so ``jgoat.split`` trains exactly these leaves. No leaf is named ``kernel``, so
LoRA-family ``jgoat.wrap`` never adapts them. Layer i's adapter at site j (attention 0, feed-forward 1 for Houlsby;
feed-forward 0 for Pfeiffer) is drawn from ``fold_in(key, 2 i + j)``, so scanned and unrolled params of one key hold
the same values (``jgoat.models.unstack_layers`` maps one to the other).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jgoat.adapters.prompt import require_hooks
from jgoat.core import ADAPTER_KEY, TrainModule, check_fields
from jgoat.hooks import BOTTLENECK_ACTIVATIONS as ACTIVATIONS
from jgoat.hooks import (
    BOTTLENECK_KEY,
    DECODER,
    ENCODER,
    DecoderSizes,
    EncoderSizes,
    bottleneck_delta,
    hook_layout,
)
from jgoat.hooks import bottleneck_output as apply_hook

PLACEMENTS = {"houlsby": "swish", "pfeiffer": "relu"}
INIT_STD = 1e-2
# Sites (paths inside one layer's params) of each placement, in the order j of their keys.
ENCODER_SITES = {"houlsby": (("attention", "output"), ("output",)), "pfeiffer": (("output",),)}
DECODER_SITES = {"houlsby": (("self_attn",), ("mlp",)), "pfeiffer": (("mlp",),)}


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck adapter.

    Attributes:
      reduction_factor: bottleneck size is ``hidden_size // reduction_factor`` (at least 1).
      placement: "houlsby" (attention output + feed-forward output, swish) or "pfeiffer" (feed-forward output,
        ReLU).

    Dtype: the ``compute_dtype="auto"`` policy of every adapter (``jgoat.core.AdapterConfig``): matmuls in the
    sub-layer output's dtype with float32 accumulation, params float32 (:func:`jgoat.hooks.bottleneck_delta`).
    """

    reduction_factor: int = 16
    placement: str = "houlsby"

    def __post_init__(self):
        check_fields(self)  # reduction_factor a positive int, placement a string
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {tuple(PLACEMENTS)}, got {self.placement!r}")

    @property
    def activation(self) -> str:
        return PLACEMENTS[self.placement]

    def bottleneck_size(self, hidden_size: int) -> int:
        """r = ``hidden_size // reduction_factor``, at least 1."""
        return max(hidden_size // self.reduction_factor, 1)


def init_node(key: jax.Array, hidden: int, bottleneck: int) -> dict[str, jax.Array]:
    """One adapter's arrays (float32): trunc-normal(std 1e-2) kernels, zero biases."""
    k_down, k_up = jax.random.split(key)
    return {
        "down_kernel": INIT_STD * jax.random.truncated_normal(k_down, -2.0, 2.0, (hidden, bottleneck), jnp.float32),
        "down_bias": jnp.zeros((bottleneck,), jnp.float32),
        "up_kernel": INIT_STD * jax.random.truncated_normal(k_up, -2.0, 2.0, (bottleneck, hidden), jnp.float32),
        "up_bias": jnp.zeros((hidden,), jnp.float32),
    }


@functools.partial(jax.jit, static_argnames=("n_layers", "hidden", "bottleneck"))
def init_site(key: jax.Array, site: int, *, n_layers: int, hidden: int, bottleneck: int) -> dict[str, jax.Array]:
    """Every layer's adapter at one site, stacked ``[L, ...]``: layer i's is ``init_node(fold_in(key, 2 i + site))``.

    One compiled call (not a few dozen eager ops per layer).
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(key, 2 * i + site))(jnp.arange(n_layers))
    return jax.vmap(lambda k: init_node(k, hidden, bottleneck))(keys)


def _placed(module: Mapping, site: tuple[str, ...], entry: dict, where: str) -> dict:
    """A copy of ``module`` with ``entry`` at ``site/jgoat_bottleneck`` (dicts on the way copied, leaves shared)."""
    if site:
        head, *rest = site
        return {**module, head: _placed(module[head], tuple(rest), entry, f"{where}/{head}")}
    if BOTTLENECK_KEY in module:
        raise ValueError(f"'{where}' already holds a bottleneck adapter")
    return {**module, BOTTLENECK_KEY: entry}


def _entry(cfg: BottleneckConfig, node: dict) -> dict:
    return {cfg.activation: {**node, ADAPTER_KEY: TrainModule()}}


def _encoder(params: Mapping, model_config: EncoderSizes) -> tuple[tuple[str, ...], Mapping]:
    prefix = model_config.base_model_prefix
    if isinstance(params.get(prefix), Mapping) and "encoder" in params[prefix]:
        return (prefix, "encoder"), params[prefix]["encoder"]
    if isinstance(params.get("encoder"), Mapping):
        return ("encoder",), params["encoder"]
    raise ValueError(
        f"params do not look like a jgoat BERT / RoBERTa ({prefix}/encoder/layer_i or encoder/layer_i; got "
        f"top-level keys {sorted(params)[:8]}): bottleneck adapters need the hook points of jgoat.models' "
        "BertModel / BertForSequenceClassification; a foreign model has none"
    )


def _add_encoder(params: Mapping, model_config: EncoderSizes, cfg: BottleneckConfig, key: jax.Array) -> dict:
    path, encoder = _encoder(params, model_config)
    r = cfg.bottleneck_size(model_config.hidden_size)
    L = model_config.num_hidden_layers
    absent = [f"layer_{i}" for i in range(L) if f"layer_{i}" not in encoder]
    if absent:
        raise ValueError(f"params have no encoder/{absent[0]} (num_hidden_layers={L})")
    new_encoder = dict(encoder)
    for j, site in enumerate(ENCODER_SITES[cfg.placement]):
        stacked = init_site(key, j, n_layers=L, hidden=model_config.hidden_size, bottleneck=r)
        for i in range(L):
            node = jax.tree.map(lambda x, i=i: x[i], stacked)
            name = f"layer_{i}"
            new_encoder[name] = _placed(new_encoder[name], site, _entry(cfg, node), "/".join((*path, name)))
    out = dict(params)
    if len(path) == 2:
        out[path[0]] = {**params[path[0]], "encoder": new_encoder}
    else:
        out["encoder"] = new_encoder
    return out


def _decoder_layer_names(params: Mapping, model_config: DecoderSizes) -> tuple[str, ...]:
    """``("layers",)`` for scanned decoder params (leaves ``[L, ...]``), ``("layers_0", ...)`` for unrolled ones."""
    model = params.get("model")
    L = model_config.num_hidden_layers
    if isinstance(model, Mapping) and isinstance(model.get("layers"), Mapping):
        n = model["layers"]["input_layernorm"]["scale"].shape[0]
        if n != L:
            raise ValueError(f"scanned params hold {n} layers, model_config has num_hidden_layers={L}")
        return ("layers",)
    names = tuple(f"layers_{i}" for i in range(L))
    if isinstance(model, Mapping) and all(isinstance(model.get(name), Mapping) for name in names):
        return names
    raise ValueError(
        f"params do not look like a jgoat decoder with {L} layers (model/layers or model/layers_0..{L - 1}; got "
        f"top-level keys {sorted(params)[:8]}): bottleneck adapters need the hook points of jgoat.models' "
        "LlamaForCausalLM / LlamaModel; a foreign model has none"
    )


def _add_decoder(params: Mapping, model_config: DecoderSizes, cfg: BottleneckConfig, key: jax.Array) -> dict:
    names = _decoder_layer_names(params, model_config)
    model = dict(params["model"])
    D, L = model_config.hidden_size, model_config.num_hidden_layers
    r = cfg.bottleneck_size(D)
    for j, site in enumerate(DECODER_SITES[cfg.placement]):
        stacked = init_site(key, j, n_layers=L, hidden=D, bottleneck=r)
        if names == ("layers",):
            model["layers"] = _placed(model["layers"], site, _entry(cfg, stacked), "model/layers")
        else:
            for i, name in enumerate(names):
                node = jax.tree.map(lambda x, i=i: x[i], stacked)
                model[name] = _placed(model[name], site, _entry(cfg, node), f"model/{name}")
    return {**params, "model": model}


def add_bottleneck(params: Mapping, model_config: EncoderSizes | DecoderSizes, cfg: BottleneckConfig, *, key: jax.Array,
                   model: Any = None) -> dict:
    """Add bottleneck adapters to the params of a jgoat BERT / RoBERTa or Llama / Mistral / Qwen2.

    Args:
      params: the 'params' collection (possibly LoRA-wrapped already) of a ``BertModel`` / classifier, or of a
        ``LlamaForCausalLM`` / ``LlamaModel`` (scanned ``model/layers`` or unrolled ``model/layers_{i}``).
      model_config: its :class:`jgoat.models.BertConfig` or :class:`jgoat.models.LlamaConfig` (any config with
        ``hook_layout`` and the sizes of :class:`jgoat.hooks.EncoderSizes` / :class:`jgoat.hooks.DecoderSizes`).
      cfg: the adapter config.
      key: PRNG key (layer i's adapter at site j is drawn from ``fold_in(key, 2 i + j)``).
      model: optional: the model, checked to have the "bottleneck" hook point.

    Returns:
      A new params tree; run it with the unchanged ``model.apply`` (or ``jgoat.apply``, ``generate``).

    Raises:
      ValueError: a model or config without the hook points, params of another layout, or adapters already there.

    Example::

      params = jgoat.add_bottleneck(params, config, jgoat.BottleneckConfig(16, "pfeiffer"), key=key)
      trainable, frozen = jgoat.split(params)
    """
    if model is not None:
        require_hooks(params, "bottleneck", model)
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict (the 'params' collection), got {type(params).__name__}")
    if hook_layout(model_config) == ENCODER:
        return _add_encoder(params, model_config, cfg, key)
    if hook_layout(model_config) == DECODER:
        return _add_decoder(params, model_config, cfg, key)
    raise ValueError(f"bottleneck adapters need a jgoat BertConfig or LlamaConfig (the hook points of jgoat's "
                     f"encoder and decoder), got {type(model_config).__name__}; jgoat's other models have none")


__all__ = [
    "ACTIVATIONS",
    "BOTTLENECK_KEY",
    "DECODER_SITES",
    "ENCODER_SITES",
    "INIT_STD",
    "PLACEMENTS",
    "BottleneckConfig",
    "add_bottleneck",
    "apply_hook",
    "bottleneck_delta",
    "init_node",
    "init_site",
]
