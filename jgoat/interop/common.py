"""What jgoat's adapter file formats share (:mod:`.peft`, :mod:`.goat`): the adapters and modules_to_save of a
single-adapter view of a wrapped tree."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from jgoat.adapters import ADAPTER_TYPES
from jgoat.core import ADAPTER_KEY, TrainModule, iter_modules
from jgoat.errors import JgoatError
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


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in `path`; a missing, non-UTF-8 or malformed file is a one-line error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JgoatError(f"{os.fspath(path)}: not valid JSON ({e})") from None


def check_number(value: Any, file: str | os.PathLike, key: str, *, integer: bool = False, positive: bool = False,
                 allow_zero: bool = False) -> None:
    """Refuse a knob read from an adapter file that is not a finite number (bool and str included), naming the file
    and key. integer: an int; positive: > 0 (≥ 0 with allow_zero)."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        what = "an integer" if integer else "a finite number"
        bound = (" >= 0" if allow_zero else " > 0") if positive else ""
        raise JgoatError(f"{os.fspath(file)}: {key} must be {what}{bound}, got {value!r}")


def all_adapters(tree: Mapping) -> list[tuple[tuple[str, ...], Any]]:
    """(path, adapter node) of every module holding an unnamed adapter."""
    return [(p, m[ADAPTER_KEY]) for p, m in iter_modules(tree) if isinstance(m.get(ADAPTER_KEY), ADAPTER_TYPES)]
