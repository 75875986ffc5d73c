"""`wrap` a Flax params tree with adapters; `split` / `combine` / `trainable_mask` / `summary` / `merge`."""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgoat._tree import (
    ADAPTER_KEY,
    Layout,
    get_at,
    iter_modules,
    linear_modules,
    path_str,
    replace_at,
    rule_matches,
    rule_parts,
)
from jgoat.adapters import (
    ADAPTER_TYPES,
    AdapterConfig,
    DoraAdapter,
    GoatAdapter,
    TrainModule,
    init_fn,
    method_name,
)
from jgoat.adapters.base import HEAD_NAMES
from jgoat.quant import NF4Kernel, dequantize

PyTree = Any


def _layout_for(path: tuple[str, ...], kernel, layouts: Mapping[str, Layout] | None) -> Layout:
    if isinstance(kernel, NF4Kernel):  # a quantised kernel knows its layout (fixed at quantize_nf4)
        return kernel.layout
    if layouts is not None and path_str(path) in layouts:
        return layouts[path_str(path)]
    return Layout(n_stack=max(kernel.ndim - 2, 0), n_in=1)


def _check_rule(rule, paths: list[tuple[str, ...]], what: str) -> None:
    """Every regex / every listed name of a rule must match at least one module."""
    for part in rule_parts(rule):
        if not any(rule_matches(part if isinstance(part, str) else list(part), p) for p in paths):
            shown = ", ".join(f"'{path_str(p)}'" for p in paths[:6]) + (" ..." if len(paths) > 6 else "")
            name = part if isinstance(part, str) else part[0]
            kind = "module" if what == "modules_to_save" else "linear module"
            raise ValueError(f"{what} rule {name!r} matches no {kind}; some real module paths: {shown}")


def select_targets(params: Mapping, cfg: AdapterConfig,
                   layouts: Mapping[str, Layout] | None = None) -> list[tuple[str, ...]]:
    """The module paths `cfg` targets, in tree order. Raises if any rule matches nothing.

    "all-linear" takes the modules `layouts` (from ``jgoat.probe``) lists, or without layouts every kernel of ndim 2
    (Dense) or 3 (Dense scanned once) — never convolutions (ndim ≥ 4) — minus output heads.
    """
    linears = [p for p, m in linear_modules(params) if ADAPTER_KEY not in m]
    if not linears:
        raise ValueError("params contain no module with a 'kernel' array; pass the 'params' collection of a model")
    if cfg.targets == "all-linear":
        def is_linear(p):
            return path_str(p) in layouts if layouts is not None else get_at(params, p)["kernel"].ndim in (2, 3)

        chosen = [p for p in linears if not set(p) & set(HEAD_NAMES) and is_linear(p)]
    else:
        _check_rule(cfg.targets, linears, "targets")
        chosen = [p for p in linears if rule_matches(cfg.targets, p)]
    if cfg.exclude:
        _check_rule(cfg.exclude, linears, "exclude")
        chosen = [p for p in chosen if not rule_matches(cfg.exclude, p)]
    if not chosen:
        raise ValueError(f"targets={cfg.targets!r} minus exclude={cfg.exclude!r} selects no module")
    return chosen


def _module_key(key: jax.Array, path: tuple[str, ...]) -> jax.Array:
    """Independent of tree order: fold a CRC of the path into the key."""
    return jax.random.fold_in(key, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)


@functools.cache
def _stacked_init(cfg: AdapterConfig, n_stack: int, quantized: bool = False):
    """jit(init) vmapped over n_stack leading layer axes (keys split per layer).

    quantized: the kernel is an NF4Kernel; each layer's init reads it dequantised (in the stored dtype, exactly the
    weights the model runs with; inits do their SVD in fp32) inside the jit — dead code, hence never materialised,
    for inits that ignore the kernel.
    """
    fn = functools.partial(init_fn(cfg), cfg)
    if quantized:
        fn = functools.partial(lambda f, node, key: f(dequantize(node).reshape(node.in_features, -1), key), fn)
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    return jax.jit(fn)


def init_layer(cfg: AdapterConfig, kernel, layout: Layout, key: jax.Array, path: str):
    """Adapter node for one (possibly stacked) kernel."""
    stack, n_in, n_out = layout.split(kernel.shape)
    cfg.check_layer(path, n_in, n_out)
    if hasattr(cfg, "for_layer"):  # path-dependent methods (IA3: feed-forward targets) specialise per layer
        cfg = cfg.for_layer(path)
    keys = jax.random.split(key, int(np.prod(stack, dtype=int))).reshape(*stack, *key.shape) if stack else key
    if isinstance(kernel, NF4Kernel):  # QLoRA: SVD-based inits (PiSSA, GOAT) and DoRA's norm see the dequantised W
        return _stacked_init(cfg, len(stack), True)(kernel, keys)
    kernel_3d = jnp.reshape(kernel, (*stack, n_in, n_out))
    return _stacked_init(cfg, len(stack))(kernel_3d, keys)


def wrap(params: PyTree, cfg: AdapterConfig, *, key: jax.Array,
         layouts: Mapping[str, Layout] | None = None) -> dict:
    """Add an adapter beside the kernel of every module `cfg` targets.

    Pure and deterministic given (params, cfg, key): the returned tree shares every base array with `params` (the
    kernels stay bit-identical) and each targeted module gains a ``jgoat`` entry holding its adapter, e.g.
    ``.../q_proj/{kernel, bias, jgoat: GoatAdapter(A [*L, E, in, d], B [*L, E, d, out], router [*L, in, E])}``.
    Stacked (scanned) layers keep their leading axes; the init is vmapped over them.

    Args:
      params: a Flax ``params`` collection (nested dicts; FrozenDict is fine).
      cfg: a method config, e.g. ``jgoat.GoatConfig(rank=32, targets=["query", "value"])``.
      key: PRNG key for random parts of the init (router, kaiming A).
      layouts: optional per-module `Layout` from ``jgoat.probe`` for kernels that are not
        [*layers, in, out] (DenseGeneral, Einsum).

    Returns:
      The wrapped params tree (plain dicts).

    Example:
      >>> wrapped = jgoat.wrap(params, jgoat.LoraConfig(rank=8, targets=["query", "value"]), key=key)
    """
    params = _to_dict(params)
    for path in select_targets(params, cfg, layouts):
        module = get_at(params, path)
        layout = _layout_for(path, module["kernel"], layouts)
        adapter = init_layer(cfg, module["kernel"], layout, _module_key(key, path), path_str(path))
        params = replace_at(params, path, lambda m, a=adapter: {**m, ADAPTER_KEY: a})
    return mark_trainable(params, cfg.modules_to_save) if cfg.modules_to_save else params


def mark_trainable(params: PyTree, modules: str | Sequence[str]) -> dict:
    """Make every param of the matching modules trainable (``modules_to_save``), e.g. a new classifier head.

    Same rule forms as ``targets``; a rule matching no module is an error. Usable alone for head-only training.
    """
    params = _to_dict(params)
    paths = [p for p, _ in iter_modules(params) if p]
    _check_rule(modules, paths, "modules_to_save")
    for path in paths:
        if rule_matches(modules, path):
            if any(isinstance(v, NF4Kernel) for v in jax.tree.leaves(get_at(params, path),
                                                                      is_leaf=lambda v: isinstance(v, NF4Kernel))):
                raise ValueError(f"module '{path_str(path)}' holds an NF4-quantised kernel, which cannot be trained; "
                                 "leave it out of jgoat.quantize_nf4 (exclude=...) to train it")
            params = replace_at(params, path, lambda m: {**m, ADAPTER_KEY: TrainModule()})
    return params


def _to_dict(tree: PyTree) -> PyTree:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _mask_module(module: Mapping, train_all: bool) -> dict:
    out = {}
    marker = isinstance(module.get(ADAPTER_KEY), TrainModule)
    for name, value in module.items():
        if isinstance(value, Mapping):
            out[name] = _mask_module(value, train_all or marker)
        elif isinstance(value, ADAPTER_TYPES):
            out[name] = value.replace(**{
                f.name: (None if getattr(value, f.name) is None else f.name in value.trainable)
                for f in dataclasses.fields(value) if f.metadata.get("pytree_node", True)
            })
        elif isinstance(value, TrainModule):
            out[name] = value
        else:
            out[name] = train_all or marker
    return out


def trainable_mask(tree: PyTree) -> PyTree:
    """A tree of bools with `tree`'s structure: True for adapter parameters and `modules_to_save` params."""
    return _mask_module(tree, False)


def split(tree: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable, frozen): two trees of `tree`'s shape with None where the other holds the leaf.

    Differentiate and optimise only `trainable`; `combine(trainable, frozen)` restores the full tree.
    """
    mask = trainable_mask(tree)
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, tree)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, tree)
    return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of `split`."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)


def adapters(tree: PyTree) -> list[tuple[str, Any]]:
    """(module path, adapter node) for every adapted module, in tree order."""
    return [(path_str(p), m[ADAPTER_KEY]) for p, m in iter_modules(tree)
            if isinstance(m.get(ADAPTER_KEY), ADAPTER_TYPES)]


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def summary(tree: PyTree) -> str:
    """A table of trainable vs total parameters per family (base, each adapter method, modules_to_save).

    Like peft's ``print_trainable_parameters`` with a row per module family. Frozen adapter state (e.g. GOAT's
    residual offset) is counted as frozen.
    """
    mask = trainable_mask(tree)
    rows: dict[str, list[int]] = {}  # family -> [layers, trainable, total]

    def add(family, layers, trainable, total):
        row = rows.setdefault(family, [0, 0, 0])
        row[0] += layers
        row[1] += trainable
        row[2] += total

    for path, module in iter_modules(tree):
        sub = get_at(mask, path)
        saved = isinstance(module.get(ADAPTER_KEY), TrainModule)
        for name, value in module.items():
            if isinstance(value, ADAPTER_TYPES):
                trainable = sum(int(np.prod(x.shape)) for m, x in zip(jax.tree.leaves(sub[name]),
                                                                      jax.tree.leaves(value), strict=True) if m)
                add(method_name(value), 1, trainable, _size(value))
            elif not isinstance(value, Mapping | TrainModule):
                n = int(np.prod(value.shape))
                add("modules_to_save" if saved else "base", 0, n if saved else 0, n)
    total = sum(r[2] for r in rows.values())
    trainable = sum(r[1] for r in rows.values())
    lines = [f"{'family':<16}{'modules':>8}{'trainable':>14}{'total':>16}"]
    for family, (layers, t, n) in rows.items():
        lines.append(f"{family:<16}{layers or '':>8}{t:>14,}{n:>16,}")
    lines.append(f"trainable params: {trainable:,} || all params: {total:,} || "
                 f"trainable%: {100.0 * trainable / max(total, 1):.4f}")
    return "\n".join(lines)


def _map_kernels(tree: PyTree, fn_name: str, layouts) -> PyTree:
    out = tree
    for path, module in iter_modules(tree):
        adapter = module.get(ADAPTER_KEY)
        if not isinstance(adapter, ADAPTER_TYPES):
            continue
        if isinstance(adapter, GoatAdapter):
            raise ValueError(f"'{path_str(path)}' holds a GOAT adapter: GOAT is never merged (its routing "
                             "depends on the input); keep it as an adapter")
        if fn_name == "unmerge" and isinstance(adapter, DoraAdapter):
            raise ValueError(f"'{path_str(path)}' holds a DoRA adapter, which has no exact unmerge; keep the "
                             "unmerged tree (jgoat is functional: merge returns a new tree)")
        kernel = module["kernel"]
        if isinstance(kernel, NF4Kernel):
            raise ValueError(f"'{path_str(path)}' has an NF4-quantised base kernel: merging into NF4 is inexact (the "
                             "merged weight would have to be re-quantised). Dequantise first: "
                             "jgoat.merge(jgoat.dequantize_tree(params))")
        stack, n_in, n_out = _layout_for(path, kernel, layouts).split(kernel.shape)
        fn = getattr(type(adapter), fn_name)
        for _ in stack:
            fn = jax.vmap(fn)
        new = {"kernel": fn(adapter, kernel.reshape(*stack, n_in, n_out)).reshape(kernel.shape)}
        bias_fn = getattr(type(adapter), f"{fn_name}_bias", None)  # methods that also rescale the bias (IA3)
        if bias_fn is not None and hasattr(module.get("bias"), "shape"):
            for _ in stack:
                bias_fn = jax.vmap(bias_fn)
            new["bias"] = bias_fn(adapter, module["bias"].reshape(*stack, n_out)).reshape(module["bias"].shape)
        out = replace_at(out, path, lambda m, k=new: {n: v for n, v in {**m, **k}.items() if n != ADAPTER_KEY})
    return out


def merge(tree: PyTree, *, layouts: Mapping[str, Layout] | None = None) -> PyTree:
    """Fold every mergeable adapter into its kernel (fp32 math, cast once) and drop the adapters.

    Returns plain params for the unmodified model. GOAT raises (routing is input-dependent).
    """
    return _strip_markers(_map_kernels(tree, "merge", layouts))


def unmerge(merged: PyTree, wrapped: PyTree, *, layouts: Mapping[str, Layout] | None = None) -> PyTree:
    """Subtract the adapters of `wrapped` from the kernels of `merged` (exact up to fp rounding; LoRA family)."""
    def graft(path_module):
        path, module = path_module
        return path, module.get(ADAPTER_KEY)

    tree = merged
    for path, adapter in map(graft, iter_modules(wrapped)):
        if isinstance(adapter, ADAPTER_TYPES):
            tree = replace_at(tree, path, lambda m, a=adapter: {**m, ADAPTER_KEY: a})
    return _map_kernels(tree, "unmerge", layouts)


def _strip_markers(tree: PyTree) -> PyTree:
    if not isinstance(tree, Mapping):
        return tree
    return {k: _strip_markers(v) for k, v in tree.items() if not isinstance(v, TrainModule)}
