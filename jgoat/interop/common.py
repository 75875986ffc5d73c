"""What jgoat's adapter file formats share (:mod:`.peft`, :mod:`.goat`): the adapters and modules_to_save of a
single-adapter view of a wrapped tree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jgoat.adapters import ADAPTER_TYPES
from jgoat.core import ADAPTER_KEY, TrainModule, iter_modules
from jgoat.wrap import adapter_names, select_adapter

PyTree = Any


def is_array(x) -> bool:
    """Whether `x` is an array (jax or numpy), not a dict, marker or adapter node."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def module_params(module: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every array leaf of a module (nested dicts included), excluding jgoat nodes and markers."""
    out = []
    for name in sorted(module):
        value = module[name]
        if name == ADAPTER_KEY:
            continue
        if isinstance(value, Mapping):
            out.extend(module_params(value, (*prefix, name)))
        elif is_array(value):
            out.append(((*prefix, name), value))
    return out


def saved_modules(tree: Mapping) -> list[tuple[tuple[str, ...], Mapping]]:
    """(path, module) of every modules_to_save module (a `TrainModule` in its slot)."""
    return [(p, m) for p, m in iter_modules(tree) if isinstance(m.get(ADAPTER_KEY), TrainModule)]


def one_adapter(tree: PyTree, adapter: str | None) -> PyTree:
    """The tree with only adapter `adapter` (for a tree of named adapters, where the name is required)."""
    if adapter is None and adapter_names(tree):
        raise ValueError(f"the tree holds named adapters {', '.join(adapter_names(tree))}: pass adapter=<name> to "
                         "export one")
    return tree if adapter is None else select_adapter(tree, adapter)


def all_adapters(tree: Mapping) -> list[tuple[tuple[str, ...], Any]]:
    """(path, adapter node) of every module holding an unnamed adapter."""
    return [(p, m[ADAPTER_KEY]) for p, m in iter_modules(tree) if isinstance(m.get(ADAPTER_KEY), ADAPTER_TYPES)]
