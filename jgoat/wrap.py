"""`wrap` a Flax params tree with adapters; `split` / `combine` / `trainable_mask` / `summary` / `merge`.

Named adapters: ``wrap(..., name="task_a")`` stores the adapter as ``module["jgoat"]["task_a"]``; several names share
one base. Every function here that acts on one adapter takes ``adapter=name`` and requires it for such a tree (a
clear error, never a silent sum); a tree wrapped without a name keeps the single-adapter layout ``module["jgoat"]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jgoat.adapters import ADAPTER_TYPES, DoraAdapter, GoatAdapter, init_fn, method_name
from jgoat.core import (
    ADAPTER_KEY,
    AdapterConfig,
    Layout,
    TrainModule,
    adapter_leaves,
    check_name,
    check_rule,
    check_rule_form,
    fingerprint,
    get_at,
    is_module,
    iter_modules,
    layout_for,
    map_slots,
    module_key,
    path_str,
    replace_at,
    rule_matches,
    select_targets,
    slot_names,
    to_dict,
)
from jgoat.errors import JgoatError
from jgoat.quant import NF4Kernel, dequantize

PyTree = Any
__all__ = [
    "add_adapter",
    "adapter_names",
    "adapters",
    "combine",
    "delete_adapter",
    "init_layer",
    "mark_trainable",
    "merge",
    "select_adapter",
    "select_targets",
    "split",
    "summary",
    "trainable_mask",
    "unmerge",
    "wrap",
]


@functools.cache
def _stacked_init(cfg: AdapterConfig, n_stack: int, quantized: bool = False,
                  layer_split: NamedSharding | None = None, out_shardings: Any = None):
    """jit(init) vmapped over n_stack leading layer axes (keys split per layer).

    quantized: the kernel is an NF4Kernel; each layer's init reads it dequantised (in the stored dtype, exactly the
    weights the model runs with; inits do their SVD in fp32) inside the jit — dead code, hence never materialised,
    for inits that ignore the kernel.
    layer_split: a sharding of the stacked kernel that splits its first layer axis over the mesh: the kernel is
    resharded to it inside the jit (an all-to-all), so each device runs the per-layer SVDs of its own layers on
    whole matrices instead of every device gathering the stacked kernel.
    out_shardings: the adapter's shardings (an adapter node of NamedShardings), the jit's output shardings.
    """
    fn = functools.partial(init_fn(cfg), cfg)
    if quantized:
        fn = functools.partial(lambda f, node, key: f(dequantize(node).reshape(node.in_features, -1), key), fn)
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    if layer_split is not None:
        fn = functools.partial(lambda f, kernel, keys: f(jax.lax.with_sharding_constraint(kernel, layer_split), keys),
                               fn)
    return jax.jit(fn, out_shardings=out_shardings)


def _layer_split(kernel: Any, stack: tuple[int, ...], ndim: int) -> NamedSharding | None:
    """For a stacked kernel sharded on a mesh: a sharding of its [*stack, in, out] reshape with the first layer axis
    over as many of the mesh's axes (in mesh order) as divide it, the rest replicated; else None."""
    sharding = getattr(kernel, "sharding", None)
    if not stack or not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return None
    mesh, axes = sharding.mesh, []
    for name, size in mesh.shape.items():
        if size > 1 and stack[0] % (int(np.prod([mesh.shape[a] for a in axes], dtype=int)) * size) == 0:
            axes.append(name)
    if not axes:
        return None
    return NamedSharding(mesh, PartitionSpec(tuple(axes), *([None] * (ndim - 1))))


def init_layer(cfg: AdapterConfig, kernel, layout: Layout, key: jax.Array, path: str, sharding: Any = None):
    """Adapter node for one (possibly stacked) kernel; `sharding` (an adapter node of NamedShardings, from
    ``jgoat.shardings``): the jitted init's output shardings, the adapter is born sharded."""
    stack, n_in, n_out = layout.split(kernel.shape)
    cfg.check_layer(path, n_in, n_out)
    if hasattr(cfg, "for_layer"):  # path-dependent methods (IA3: feed-forward targets) specialise per layer
        cfg = cfg.for_layer(path)
    keys = jax.random.split(key, int(np.prod(stack, dtype=int))).reshape(*stack, *key.shape) if stack else key
    if isinstance(kernel, NF4Kernel):  # QLoRA: SVD-based inits (PiSSA, GOAT) and DoRA's norm see the dequantised W
        return _stacked_init(cfg, len(stack), True, None, sharding)(kernel, keys)
    kernel_3d = jnp.reshape(kernel, (*stack, n_in, n_out))
    split = _layer_split(kernel, stack, kernel_3d.ndim)
    return _stacked_init(cfg, len(stack), False, split, sharding)(kernel_3d, keys)


def _adapter_shardings(params: Mapping, cfg: AdapterConfig, key: jax.Array, layouts: Mapping[str, Layout] | None,
                       shardings: Callable[[PyTree], PyTree]) -> Callable[[tuple[str, ...]], Any]:
    """path -> the shardings `shardings` assigns the adapter wrap adds there, read off the abstract wrapped tree
    (``jax.eval_shape``: the inits are traced, nothing is computed)."""
    abstract = jax.eval_shape(lambda p: wrap(p, cfg, key=key, layouts=layouts), params)
    placed = shardings(abstract)
    return lambda path: get_at(placed, path)[ADAPTER_KEY]


def wrap(params: PyTree, cfg: AdapterConfig, *, key: jax.Array,
         layouts: Mapping[str, Layout] | None = None, name: str | None = None,
         shardings: Callable[[PyTree], PyTree] | None = None) -> dict:
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
      name: add a named adapter (``.../jgoat/{name}: adapter``) beside those `params` already holds; call again with
        another name (any method and targets) to add more. The arrays equal an unnamed wrap's with the same key.
        Select one with ``adapter=name`` in ``jgoat.apply`` / ``split`` / ``merge``, or per example with
        ``jgoat.apply(fn, adapter=(names...))(..., adapter_ids=ids)``. A named adapter has no modules_to_save of
        its own (all names run the same modules): mark shared ones with ``jgoat.mark_trainable``.
      shardings: for params on a device mesh: a function from the (abstract) wrapped tree to its tree of shardings,
        e.g. ``functools.partial(jgoat.shardings, mesh=mesh)``. Each adapter's init is then jitted with the
        adapter's shardings as output shardings (born sharded, never gathered to one device), and the SVD inits of
        a stacked kernel run with its layer axis split over the mesh (each device decomposes whole matrices of its
        own layers). The arrays equal the single-device wrap's. Without it, inits on sharded kernels still run
        jitted (the layer split included; one kernel at a time), their outputs placed as XLA propagates.

    Returns:
      The wrapped params tree (plain dicts).

    Example:
      >>> wrapped = jgoat.wrap(params, jgoat.LoraConfig(rank=8, targets=["query", "value"]), key=key)
      >>> multi = jgoat.wrap(jgoat.wrap(params, cfg_a, key=k1, name="a"), cfg_b, key=k2, name="b")
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"jgoat.wrap adds linear adapters (LoraConfig, GoatConfig, ...), got {type(cfg).__name__}: "
                        "prompt/prefix tuning and bottleneck adapters change the model graph, add them with "
                        "jgoat.add_prompt / add_prefix / add_bottleneck (they are shared, never named)")
    params = to_dict(params)
    if name is not None:
        _check_new_name(params, name)
        if cfg.modules_to_save:
            raise ValueError(f"modules_to_save={cfg.modules_to_save!r} cannot belong to the named adapter {name!r}: "
                             "every named adapter runs the same modules; mark shared ones with jgoat.mark_trainable")
        base = map_slots(params, lambda slot: None if is_module(slot) else slot)
        return add_adapter(params, wrap(base, cfg, key=key, layouts=layouts, shardings=shardings), name=name)
    if slot_names(params):
        raise ValueError(f"params hold named adapters {slot_names(params)}: add another with name=...")
    unnamed = _unnamed_paths(params)
    if unnamed:  # adding adapters to other modules is fine (per-module configs); wrapping a module twice is not
        base = map_slots(params, lambda slot: slot if isinstance(slot, TrainModule) else None)
        again = [path_str(p) for p in select_targets(base, cfg, layouts) if path_str(p) in unnamed]
        if again:
            raise JgoatError(f"params are already wrapped: '{again[0]}' holds an adapter that {type(cfg).__name__}"
                             "'s targets select again; wrap the base params once, or give every adapter a name=... "
                             "to stack several on one base")
    targets = select_targets(params, cfg, layouts)
    for path in targets:
        _check_interceptable(path, get_at(params, path)["kernel"], layouts)
    if cfg.reads_base:
        _check_finite_base(params, targets, cfg)
    placed = None if shardings is None else _adapter_shardings(params, cfg, key, layouts, shardings)
    for path in targets:
        module = get_at(params, path)
        layout = layout_for(path, module["kernel"], layouts)
        adapter = init_layer(cfg, module["kernel"], layout, module_key(key, path), path_str(path),
                             None if placed is None else placed(path))
        params = replace_at(params, path, lambda m, a=adapter: {**m, ADAPTER_KEY: a})
    return mark_trainable(params, cfg.modules_to_save) if cfg.modules_to_save else params


def _check_interceptable(path: tuple[str, ...], kernel: Any, layouts: Mapping[str, Layout] | None) -> None:
    """Refuse a target `jgoat.apply`'s interceptor would never reach (its adapter: trainable, never applied)."""
    shape = tuple(kernel.shape)
    if layouts is not None and path_str(path) not in layouts:
        raise JgoatError(f"target '{path_str(path)}' (kernel {shape}) is not a linear module jgoat.probe saw called "
                         "as Dense / DenseGeneral / Einsum (or a registered class): jgoat cannot apply an adapter "
                         "there; exclude it from the targets")
    if layouts is None and not isinstance(getattr(kernel, "layout", None), Layout) and kernel.ndim >= 4:
        raise JgoatError(f"target '{path_str(path)}' holds a {kernel.ndim}-D kernel {shape}, a convolution's "
                         "layout: jgoat applies adapters to linear modules (Dense, DenseGeneral, Einsum) only; "
                         "exclude it, or pass layouts=jgoat.probe(model, params, x) if it is a stacked linear")


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all() if leaves else jnp.bool_(True)


def _check_finite_base(params: Mapping, targets: Sequence[tuple[str, ...]], cfg: AdapterConfig) -> None:
    """Refuse NaN/inf in a targeted kernel before an init decomposes it (one jitted reduction per kernel).

    Under a trace (``jax.jit(jgoat.wrap)``, ``jax.eval_shape``, as `jgoat.memory` plans) there are no values to check.
    """
    for path in targets:
        kernel = get_at(params, path)["kernel"]
        leaves = [x for x in jax.tree.leaves(kernel) if jnp.issubdtype(x.dtype, jnp.inexact)]
        finite = _all_finite(leaves)
        if isinstance(finite, jax.core.Tracer):
            return
        if not bool(finite):
            raise JgoatError(f"base weight '{path_str(path)}/kernel' holds NaN or inf values: {type(cfg).__name__}'s "
                             "init decomposes the base kernel, which must be finite; check the checkpoint")


def mark_trainable(params: PyTree, modules: str | Sequence[str]) -> dict:
    """Make every param of the matching modules trainable (``modules_to_save``), e.g. a new classifier head.

    Same rule forms as ``targets``; a rule matching no module is an error. Usable alone for head-only training.
    """
    params = to_dict(params)
    check_rule_form(modules, "modules_to_save")
    paths = [p for p, _ in iter_modules(params) if p]
    check_rule(modules, paths, "modules_to_save")
    for path in paths:
        if rule_matches(modules, path):
            if is_module(get_at(params, path).get(ADAPTER_KEY)):
                raise ValueError(f"module '{path_str(path)}' holds named adapters; a module cannot be both adapted "
                                 "and trained in full")
            if any(isinstance(v, NF4Kernel) for v in jax.tree.leaves(get_at(params, path),
                                                                      is_leaf=lambda v: isinstance(v, NF4Kernel))):
                raise ValueError(f"module '{path_str(path)}' holds an NF4-quantised kernel, which cannot be trained; "
                                 "leave it out of jgoat.quantize_nf4 (exclude=...) to train it")
            params = replace_at(params, path, lambda m: {**m, ADAPTER_KEY: TrainModule()})
    return params


def adapter_names(tree: PyTree) -> tuple[str, ...]:
    """The names of the named adapters in `tree`, sorted; () for a tree wrapped without a name."""
    return slot_names(tree)


def _unnamed_paths(tree: PyTree) -> list[str]:
    return [path_str(p) for p, m in iter_modules(tree) if isinstance(m.get(ADAPTER_KEY), ADAPTER_TYPES)]


def _check_new_name(tree: PyTree, name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"an adapter name must be a non-empty string without '/', got {name!r}")
    unnamed = _unnamed_paths(tree)
    if unnamed:
        raise ValueError(f"params hold an unnamed adapter (e.g. at '{unnamed[0]}'); named and unnamed adapters do "
                         "not mix: name it with jgoat.add_adapter(base_params, wrapped, name=...)")
    if name in slot_names(tree):
        raise ValueError(f"an adapter named {name!r} already exists (names: {slot_names(tree)}); remove it first "
                         "with jgoat.delete_adapter")


def _check_same_base(tree: PyTree, source: PyTree) -> None:
    """`source` must be the base of `tree`: same modules, same base weights, same modules_to_save (shared)."""
    base_t, base_s = (map_slots(t, lambda slot: slot if isinstance(slot, TrainModule) else None)
                      for t in (tree, source))
    (leaves_t, def_t), (leaves_s, def_s) = jax.tree.flatten(base_t), jax.tree.flatten(base_s)
    if def_t != def_s:
        raise ValueError("the adapters' source tree has other modules or modules_to_save than the tree they are "
                         "added to: wrap the same base (a named adapter cannot bring its own modules_to_save)")
    if all(u is v for u, v in zip(leaves_t, leaves_s, strict=True)):  # the common case: wrap shares base arrays
        return
    if fingerprint(base_t) != fingerprint(base_s):
        raise ValueError("the adapters' source tree was wrapped on a different base model (fingerprints differ)")
    saved_t, saved_s = adapter_leaves(base_t), adapter_leaves(base_s)
    differ = [p for p in saved_t if not np.array_equal(saved_t[p], saved_s[p])]
    if differ:
        raise ValueError(f"modules_to_save param '{differ[0]}' differs between the source and the tree: named "
                         "adapters share modules_to_save, a named adapter cannot bring its own")


def add_adapter(tree: PyTree, source: PyTree, *, name: str) -> dict:
    """Add the (unnamed) adapters of `source` to `tree` as the named adapter `name`.

    Args:
      tree: the base params, or a tree of named adapters on that base.
      source: a tree with unnamed adapters on the same base (``jgoat.wrap`` without a name, ``import_peft``,
        ``gora_wrap``, a restored checkpoint); checked by identity of the base arrays, else by the base fingerprint.
      name: the new adapter's name (not yet in `tree`).

    Returns:
      `tree` with ``module["jgoat"][name]`` set for every module `source` adapts.

    Example:
      >>> multi = jgoat.add_adapter(multi, jgoat.import_peft(params, "peft_dir"), name="from_peft")
    """
    tree, source = to_dict(tree), to_dict(source)
    _check_new_name(tree, name)
    if slot_names(source):
        raise ValueError(f"source holds named adapters {slot_names(source)}: pass jgoat.select_adapter(source, n)")
    found = [(p, m[ADAPTER_KEY]) for p, m in iter_modules(source) if isinstance(m.get(ADAPTER_KEY), ADAPTER_TYPES)]
    if not found:
        raise ValueError("source holds no adapter: wrap it with jgoat.wrap first")
    _check_same_base(tree, source)
    for path, adapter in found:
        tree = replace_at(tree, path, lambda m, a=adapter: {**m, ADAPTER_KEY: {**m.get(ADAPTER_KEY, {}), name: a}})
    return tree


def select_adapter(tree: PyTree, name: str) -> dict:
    """`tree` with only the named adapter `name`, stored unnamed: what ``jgoat.wrap`` without a name would give.

    Everything written for single-adapter trees (export_peft, export_goat, lori/gora helpers, save) takes it.
    """
    check_name(name, slot_names(tree))
    return map_slots(tree, lambda slot: slot.get(name) if is_module(slot) else slot)


def delete_adapter(tree: PyTree, name: str) -> dict:
    """`tree` without the named adapter `name` (the others and the base untouched)."""
    check_name(name, slot_names(tree))

    def drop(slot):
        if not is_module(slot):
            return slot
        return {n: a for n, a in slot.items() if n != name} or None

    return map_slots(tree, drop)


def _resolve(tree: PyTree, adapter: str | None) -> PyTree:
    """The single-adapter view of `tree`: itself when it holds no named adapter, else ``select_adapter(tree,
    adapter)``; a named tree without a choice (or an unknown name) is a ValueError listing the names."""
    names = slot_names(tree)
    if adapter is None:
        if names:
            raise ValueError(f"the tree holds named adapters {names}: choose one with adapter=...")
        return tree
    check_name(adapter, names)
    return select_adapter(tree, adapter)


def _adapter_mask(adapter, train: bool):
    """The adapter node with a bool (None for absent optional arrays) per array field: trainable fields if train."""
    return adapter.replace(**{
        f.name: (None if getattr(adapter, f.name) is None else train and f.name in adapter.trainable)
        for f in dataclasses.fields(adapter) if f.metadata.get("pytree_node", True)
    })


def _mask_module(module: Mapping, train_all: bool, chosen, shared: bool) -> dict:
    """chosen(name): whether a named adapter trains; shared: whether unnamed adapters and modules_to_save train."""
    out = {}
    marker = shared and isinstance(module.get(ADAPTER_KEY), TrainModule)
    for name, value in module.items():
        if name == ADAPTER_KEY and isinstance(value, Mapping):
            out[name] = {n: _adapter_mask(a, chosen(n)) for n, a in value.items()}
        elif isinstance(value, Mapping):
            out[name] = _mask_module(value, train_all or marker, chosen, shared)
        elif isinstance(value, ADAPTER_TYPES):
            out[name] = _adapter_mask(value, True)
        elif isinstance(value, TrainModule):
            out[name] = value
        else:
            out[name] = train_all or marker
    return out


def trainable_mask(tree: PyTree, *, adapter: str | None = None) -> PyTree:
    """A tree of bools with `tree`'s structure: True for adapter parameters and `modules_to_save` params.

    For a tree of named adapters, `adapter` (required) names the one that trains; the other named adapters, the
    base and the shared modules_to_save stay frozen.
    """
    names = slot_names(tree)
    if adapter is None:
        if names:
            raise ValueError(f"the tree holds named adapters {names}: choose the one to train with adapter=...")
        return _mask_module(tree, False, None, True)
    check_name(adapter, names)
    return _mask_module(tree, False, lambda n: n == adapter, False)


def split(tree: PyTree, *, adapter: str | None = None) -> tuple[PyTree, PyTree]:
    """(trainable, frozen): two trees of `tree`'s shape with None where the other holds the leaf.

    Differentiate and optimise only `trainable`; `combine(trainable, frozen)` restores the full tree. For a tree of
    named adapters, ``adapter=name`` (required) picks the one to train (see `trainable_mask`).
    """
    mask = trainable_mask(tree, adapter=adapter)
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, tree)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, tree)
    return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of `split`."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)


def adapters(tree: PyTree, *, adapter: str | None = None) -> list[tuple[str, Any]]:
    """(module path, adapter node) for every adapted module, in tree order (of the named `adapter` if named)."""
    tree = _resolve(tree, adapter)
    return [(path_str(p), m[ADAPTER_KEY]) for p, m in iter_modules(tree)
            if isinstance(m.get(ADAPTER_KEY), ADAPTER_TYPES)]


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _trainable_size(mask, tree) -> int:
    return sum(int(np.prod(x.shape)) for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(tree), strict=True) if m)


def summary(tree: PyTree) -> str:
    """A table of trainable vs total parameters per family (base, each adapter method, modules_to_save).

    Like peft's ``print_trainable_parameters`` with a row per module family. Frozen adapter state (e.g. GOAT's
    residual offset) is counted as frozen. Named adapters get a row each, ``name (method)``, counting what
    ``split(tree, adapter=name)`` trains; the totals then add up every named adapter.
    """
    mask = _mask_module(tree, False, lambda n: True, True)
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
            if name == ADAPTER_KEY and isinstance(value, Mapping):
                for n, a in value.items():
                    add(f"{n} ({method_name(a)})", 1, _trainable_size(sub[name][n], a), _size(a))
            elif isinstance(value, ADAPTER_TYPES):
                add(method_name(value), 1, _trainable_size(sub[name], value), _size(value))
            elif not isinstance(value, Mapping | TrainModule):
                n = int(np.prod(value.shape))
                add("modules_to_save" if saved else "base", 0, n if saved else 0, n)
    total = sum(r[2] for r in rows.values())
    trainable = sum(r[1] for r in rows.values())
    width = max(16, *(len(f) + 2 for f in rows))
    lines = [f"{'family':<{width}}{'modules':>8}{'trainable':>14}{'total':>16}"]
    for family, (layers, t, n) in rows.items():
        lines.append(f"{family:<{width}}{layers or '':>8}{t:>14,}{n:>16,}")
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
        stack, n_in, n_out = layout_for(path, kernel, layouts).split(kernel.shape)
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


def merge(tree: PyTree, *, layouts: Mapping[str, Layout] | None = None, adapter: str | None = None) -> PyTree:
    """Fold every mergeable adapter into its kernel (fp32 math, cast once) and drop the adapters.

    Returns plain params for the unmodified model. GOAT raises (routing is input-dependent). For a tree of named
    adapters, ``adapter=name`` (required) is the one folded in; the others are dropped.
    """
    return _strip_markers(_map_kernels(_resolve(tree, adapter), "merge", layouts))


def unmerge(merged: PyTree, wrapped: PyTree, *, layouts: Mapping[str, Layout] | None = None,
            adapter: str | None = None) -> PyTree:
    """Subtract the adapters of `wrapped` (its named `adapter`, if named) from the kernels of `merged` (exact up to
    fp rounding; LoRA family)."""
    wrapped = _resolve(wrapped, adapter)
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
