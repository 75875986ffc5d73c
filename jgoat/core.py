"""Walking Flax parameter trees: modules are dicts, a linear module is one holding a `kernel` array.

An adapted module holds its adapter in a slot: ``module["jgoat"]``. The slot holds one adapter node (a tree wrapped
without a name), a `TrainModule` marker (modules_to_save), or a dict {name: adapter node} of named adapters.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

ADAPTER_KEY = "jgoat"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a kernel's dims split: [*stack (n_stack dims), *in (n_in dims), *out (the rest)].

    The default for a kernel of ndim D is n_stack = D − 2, n_in = 1 (a Dense, scanned over D − 2 layer axes).
    `jgoat.probe` measures the exact layout of every linear in a model (DenseGeneral, Einsum, scan).
    """

    n_stack: int = 0
    n_in: int = 1

    def split(self, shape: Sequence[int]) -> tuple[tuple[int, ...], int, int]:
        """(stack_shape, in_features, out_features) of a kernel shape."""
        stack = tuple(shape[: self.n_stack])
        in_dims = shape[self.n_stack : self.n_stack + self.n_in]
        out_dims = shape[self.n_stack + self.n_in :]
        if not out_dims:
            raise ValueError(f"kernel shape {tuple(shape)} has no output dims under {self}")
        return stack, _prod(in_dims), _prod(out_dims)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def is_module(node: Any) -> bool:
    return isinstance(node, Mapping)


def iter_modules(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping]]:
    """Every dict in the tree (depth first, sorted keys) with its path; a slot of named adapters is not a module."""
    yield prefix, tree
    for name in sorted(tree):
        child = tree[name]
        if is_module(child) and name != ADAPTER_KEY:
            yield from iter_modules(child, (*prefix, str(name)))


def slot_names(tree: Mapping) -> tuple[str, ...]:
    """The names of the named adapters anywhere in `tree`, sorted (empty for unnamed or no adapters)."""
    found = {name for _, m in iter_modules(tree) if is_module(m.get(ADAPTER_KEY)) for name in m[ADAPTER_KEY]}
    return tuple(sorted(found))


def check_name(name: str, known: Sequence[str]) -> None:
    """Raise a ValueError naming the known adapters unless `name` is one of them."""
    if name not in known:
        shown = ", ".join(repr(n) for n in known) if known else "none (the tree holds no named adapters)"
        raise ValueError(f"unknown adapter {name!r}; named adapters in this tree: {shown}")


def map_slots(tree: Mapping, fn: Callable[[Any], Any]) -> dict:
    """A copy of `tree` (dicts only) with every adapter slot replaced by fn(slot); a slot mapped to None is removed."""
    out = {}
    for name, child in tree.items():
        if name == ADAPTER_KEY:
            child = fn(child)
            if child is None:
                continue
        elif is_module(child):
            child = map_slots(child, fn)
        out[name] = child
    return out


def linear_modules(tree: Mapping) -> list[tuple[tuple[str, ...], Mapping]]:
    """Modules that hold a `kernel` array (linear-like: Dense, DenseGeneral, Einsum, conv)."""
    return [(p, m) for p, m in iter_modules(tree) if "kernel" in m and hasattr(m["kernel"], "shape")]


def path_str(path: Sequence[str]) -> str:
    return "/".join(path)


def replace_at(tree: Mapping, path: Sequence[str], fn: Callable[[Mapping], Mapping]) -> dict:
    """A copy of `tree` (dicts copied along `path` only) with the module at `path` replaced by fn(module)."""
    if not path:
        return fn(tree)
    out = dict(tree)
    out[path[0]] = replace_at(tree[path[0]], path[1:], fn)
    return out


def get_at(tree: Mapping, path: Sequence[str]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def rule_matches(rule: str | Sequence[str], path: Sequence[str]) -> bool:
    """A regex string must match the whole '/'-path; a list of names matches the last component or a suffix."""
    joined = path_str(path)
    if isinstance(rule, str):
        return re.fullmatch(rule, joined) is not None
    return any(joined == name or joined.endswith("/" + name) for name in rule)


def rule_parts(rule: str | Sequence[str]) -> list[str | tuple[str]]:
    """Each independently checkable part of a rule: the regex itself, or each name of a list."""
    return [rule] if isinstance(rule, str) else [(name,) for name in rule]
