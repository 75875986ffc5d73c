"""Adapter methods: one module per family, each a pure `init` plus a pytree node with `forward` (and `merge`)."""

from __future__ import annotations

from flax import struct

from jgoat.adapters import dora, goat, lora
from jgoat.adapters.base import AdapterConfig
from jgoat.adapters.dora import DoraAdapter
from jgoat.adapters.goat import GoatAdapter, GoatConfig, MoLoraConfig
from jgoat.adapters.lora import LoraAdapter, LoraConfig


@struct.dataclass
class TrainModule:
    """Marker placed beside the params of a `modules_to_save` module: all of that module's params are trainable."""


ADAPTER_TYPES = (LoraAdapter, DoraAdapter, GoatAdapter)


def init_fn(cfg: AdapterConfig):
    """The per-layer `init(cfg, kernel_IxO, key)` of the method a config selects."""
    if isinstance(cfg, GoatConfig):
        return goat.init
    if isinstance(cfg, LoraConfig):
        return dora.init if cfg.use_dora else lora.init
    raise TypeError(f"unsupported adapter config {type(cfg).__name__}")


def method_name(adapter) -> str:
    if isinstance(adapter, GoatAdapter):
        return "goat"
    return {LoraAdapter: "lora", DoraAdapter: "dora"}[type(adapter)]


__all__ = [
    "ADAPTER_TYPES",
    "AdapterConfig",
    "DoraAdapter",
    "GoatAdapter",
    "GoatConfig",
    "LoraAdapter",
    "LoraConfig",
    "MoLoraConfig",
    "TrainModule",
    "init_fn",
    "method_name",
]
