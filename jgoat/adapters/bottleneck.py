"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), as AdapterHub's ``adapters`` (not in peft).

``a(h) = Up(φ(Down(h)))`` with ``Down: D -> D / reduction_factor`` and ``Up`` back to D, inserted in the residual
of a sub-layer's output: ``out = LN(x + h + a(h))`` where h is the sub-layer's projected (and dropped-out) output, x
its residual input and LN the sub-layer's own (frozen) LayerNorm.

  * Houlsby: after the attention output AND after the feed-forward output, φ = swish (SiLU);
  * Pfeiffer: after the feed-forward output only, φ = ReLU.

Near-identity init: Down / Up kernels truncated-normal (±2σ) with std 1e-2, zero biases, so ``|a(h)|`` is tiny.

The adapter changes the model graph, so it is read by an explicit hook point of jgoat's BERT / RoBERTa
(``BertSelfOutput``: ``.../attention/output`` and ``.../output`` of every ``layer_{i}``). Its params sit beside the
frozen base in that module's dict::

    .../attention/output/jgoat_bottleneck/{swish|relu}/{down_kernel [D, r], down_bias [r], up_kernel [r, D], up_bias}

The activation is the name of the inner dict (static, so no non-array leaf); that dict holds a
``jgoat: TrainModule()`` marker so ``jgoat.split`` trains exactly these leaves. No leaf is named ``kernel``, so
LoRA-family ``jgoat.wrap`` never adapts them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jgoat.adapters.prompt import require_hooks

BOTTLENECK_KEY = "jgoat_bottleneck"
PLACEMENTS = {"houlsby": "swish", "pfeiffer": "relu"}
ACTIVATIONS = {"swish": jax.nn.silu, "relu": jax.nn.relu}
INIT_STD = 1e-2


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck adapter.

    Attributes:
      reduction_factor: bottleneck size is ``hidden_size // reduction_factor`` (at least 1).
      placement: "houlsby" (attention output + feed-forward output, swish) or "pfeiffer" (feed-forward output,
        ReLU).
    """

    reduction_factor: int = 16
    placement: str = "houlsby"

    def __post_init__(self):
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be a positive int, got {self.reduction_factor!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {tuple(PLACEMENTS)}, got {self.placement!r}")

    @property
    def activation(self) -> str:
        return PLACEMENTS[self.placement]


def init_node(key: jax.Array, hidden: int, bottleneck: int) -> dict[str, jax.Array]:
    """One adapter's arrays (float32): trunc-normal(std 1e-2) kernels, zero biases."""
    k_down, k_up = jax.random.split(key)
    return {
        "down_kernel": INIT_STD * jax.random.truncated_normal(k_down, -2.0, 2.0, (hidden, bottleneck), jnp.float32),
        "down_bias": jnp.zeros((bottleneck,), jnp.float32),
        "up_kernel": INIT_STD * jax.random.truncated_normal(k_up, -2.0, 2.0, (bottleneck, hidden), jnp.float32),
        "up_bias": jnp.zeros((hidden,), jnp.float32),
    }


def bottleneck_delta(node: Mapping[str, jax.Array], h_BxTxD: jax.Array, activation: str) -> jax.Array:
    """``a(h) = φ(h Down + b_down) Up + b_up`` in float32, returned in h's dtype."""
    h32 = h_BxTxD.astype(jnp.float32)
    lead = (1,) * (h32.ndim - 1)  # explicit broadcasting of the biases over the token dims

    def bias(name):
        return node[name].astype(jnp.float32).reshape(*lead, -1)

    z = ACTIVATIONS[activation](h32 @ node["down_kernel"].astype(jnp.float32) + bias("down_bias"))
    a = z @ node["up_kernel"].astype(jnp.float32) + bias("up_bias")
    return a.astype(h_BxTxD.dtype)


def apply_hook(module: Any, h_BxTxD: jax.Array) -> jax.Array:
    """Hook point of BERT's ``BertSelfOutput``: ``h + a(h)`` when the module's params hold an adapter, else h."""
    if not module.has_variable("params", BOTTLENECK_KEY):
        return h_BxTxD
    entry = module.get_variable("params", BOTTLENECK_KEY)
    for activation, node in entry.items():
        if activation not in ACTIVATIONS:
            raise ValueError(f"{BOTTLENECK_KEY} at '{'/'.join(module.path)}' has unknown activation {activation!r}; "
                             f"known: {sorted(ACTIVATIONS)}")
        h_BxTxD = h_BxTxD + bottleneck_delta(node, h_BxTxD, activation)
    return h_BxTxD


def _encoder(params: Mapping, model_config: Any) -> tuple[tuple[str, ...], Mapping]:
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


def add_bottleneck(params: Mapping, model_config: Any, cfg: BottleneckConfig, *, key: jax.Array,
                   model: Any = None) -> dict:
    """Add bottleneck adapters to the params of a jgoat BERT / RoBERTa (``BertModel`` or a classifier).

    Args:
      params: the 'params' collection (possibly LoRA-wrapped already).
      model_config: its :class:`jgoat.models.BertConfig`.
      cfg: the adapter config.
      key: PRNG key (each adapter's key folds in its layer index and site).
      model: optional: the model, checked to have the "bottleneck" hook point.

    Returns:
      A new params tree; run it with the unchanged ``model.apply`` (or ``jgoat.apply``).

    Example::

      params = jgoat.add_bottleneck(params, config, jgoat.BottleneckConfig(16, "pfeiffer"), key=key)
    """
    from jgoat.adapters import TrainModule
    from jgoat.models.bert import BertConfig

    if model is not None:
        require_hooks(params, "bottleneck", model)
    if not isinstance(model_config, BertConfig):
        raise ValueError(f"bottleneck adapters need a jgoat BertConfig (the encoder's hook points), got "
                         f"{type(model_config).__name__}; jgoat's other models have no bottleneck hook point")
    path, encoder = _encoder(params, model_config)
    D = model_config.hidden_size
    r = max(D // cfg.reduction_factor, 1)
    sites = [("attention", "output"), ("output",)] if cfg.placement == "houlsby" else [("output",)]
    new_encoder = dict(encoder)
    for i in range(model_config.num_hidden_layers):
        name = f"layer_{i}"
        if name not in encoder:
            raise ValueError(f"params have no encoder/{name} (num_hidden_layers={model_config.num_hidden_layers})")
        layer = dict(new_encoder[name])
        for j, site in enumerate(sites):
            parent = layer
            for part in site[:-1]:
                parent[part] = dict(parent[part])
                parent = parent[part]
            module = dict(parent[site[-1]])
            if BOTTLENECK_KEY in module:
                raise ValueError(f"'{'/'.join((*path, name, *site))}' already holds a bottleneck adapter")
            node = init_node(jax.random.fold_in(key, 2 * i + j), D, r)
            module[BOTTLENECK_KEY] = {cfg.activation: {**node, "jgoat": TrainModule()}}
            parent[site[-1]] = module
        new_encoder[name] = layer
    out = dict(params)
    if len(path) == 2:
        out[path[0]] = {**params[path[0]], "encoder": new_encoder}
    else:
        out["encoder"] = new_encoder
    return out
