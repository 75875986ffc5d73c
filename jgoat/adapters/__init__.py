"""Adapter methods: one module per family, each a pure `init` plus a pytree node with `forward` (and `merge`).

Adapters import only :mod:`jgoat.core` (and :mod:`jgoat.hooks` for the graph-changing methods); what needs the
whole tree, a loss or a checkpoint (GoRA's gradients and rank allocation) lives above them in :mod:`jgoat.grad_init`.
"""

from __future__ import annotations

from jgoat.adapters import dora, goat, ia3, kasa, lora, lori
from jgoat.adapters.dora import DoraAdapter
from jgoat.adapters.goat import GoatAdapter, GoatConfig, MoLoraConfig
from jgoat.adapters.gora import GoraAdapter, GoraConfig
from jgoat.adapters.ia3 import IA3Adapter, IA3Config, IA3LayerConfig
from jgoat.adapters.kasa import KasaAdapter, KasaConfig, regularizer
from jgoat.adapters.lora import LoraAdapter, LoraConfig
from jgoat.adapters.lori import LoriAdapter, LoriConfig, lori_concat, lori_masks, lori_sparse
from jgoat.core import AdapterConfig, TrainModule

ADAPTER_TYPES = (LoraAdapter, DoraAdapter, GoatAdapter, IA3Adapter, KasaAdapter, LoriAdapter, GoraAdapter)


def init_fn(cfg: AdapterConfig):
    """The per-layer `init(cfg, kernel_IxO, key)` of the method a config selects."""
    if isinstance(cfg, GoatConfig):
        return goat.init
    if isinstance(cfg, LoraConfig):
        return dora.init if cfg.use_dora else lora.init
    if isinstance(cfg, IA3LayerConfig):
        return ia3.init
    if isinstance(cfg, IA3Config):
        raise TypeError("IA3Config is per-layer (feed-forward targets are scaled on their input): initialise with "
                        "init_fn(cfg.for_layer(path)), as jgoat.wrap does")
    if isinstance(cfg, KasaConfig):
        return kasa.init
    if isinstance(cfg, LoriConfig):
        return lori.init
    if isinstance(cfg, GoraConfig):
        raise TypeError("GoRA's init needs the accumulated base gradients and per-layer ranks: use "
                        "jgoat.gora_wrap(params, cfg, jgoat.gora_gradients(params, loss_fn, batches, targets=cfg), "
                        "key=key) instead of jgoat.wrap")
    raise TypeError(f"unsupported adapter config {type(cfg).__name__}")


def method_name(adapter) -> str:
    if isinstance(adapter, GoatAdapter):
        return "goat"
    return {LoraAdapter: "lora", DoraAdapter: "dora", IA3Adapter: "ia3", KasaAdapter: "kasa",
            LoriAdapter: "lori", GoraAdapter: "gora"}[type(adapter)]


__all__ = [
    "ADAPTER_TYPES",
    "AdapterConfig",
    "DoraAdapter",
    "GoatAdapter",
    "GoatConfig",
    "GoraAdapter",
    "GoraConfig",
    "IA3Adapter",
    "IA3Config",
    "IA3LayerConfig",
    "KasaAdapter",
    "KasaConfig",
    "LoraAdapter",
    "LoraConfig",
    "LoriAdapter",
    "LoriConfig",
    "MoLoraConfig",
    "TrainModule",
    "init_fn",
    "lori_concat",
    "lori_masks",
    "lori_sparse",
    "method_name",
    "regularizer",
]
