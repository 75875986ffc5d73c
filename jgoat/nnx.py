"""Flax NNX: jgoat's adapters on an unmodified ``nnx.Module``, run by the same per-method math as on linen.

    model = MyNNXModel(rngs=nnx.Rngs(0))
    jgoat.nnx.wrap(model, jgoat.GoatConfig(rank=8, experts=4, targets=["up", "down"]), key=key)
    out, aux = jgoat.nnx.apply(model, x)        # or plain model(x); aux: GOAT's load-balancing loss
    optimizer = nnx.Optimizer(model, tx, wrt=jgoat.nnx.Adapter)

Where adapters live: in the model's own NNX state. Each adapted module (``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Einsum`` or a class given to ``jgoat.register_linear``) gains one child module ``jgoat`` (an `AdapterSlot`)
beside its ``kernel``, so the state path of an adapter array is the linen tree's (``.../up/jgoat/A``). Its arrays
are variables of jgoat's types: trainable ones are `Adapter` (a subclass of ``nnx.LoRAParam``, so
``nnx.Optimizer(model, tx, wrt=jgoat.nnx.Adapter)``, ``nnx.state(model, jgoat.nnx.Adapter)`` and
``nnx.split(model, jgoat.nnx.Adapter, ...)`` select exactly them, and tools that train ``nnx.LoRAParam`` state —
qwix / tunix — train them too); frozen ones (GOAT / PiSSA residual offsets, LoRI masks, GoRA ranks) are
`AdapterConst`; per-layer accumulators (GOAT's aux loss and expert load) are `AdapterAux`. The state is chosen over a
side tree because NNX's own transforms (``nnx.jit``, ``nnx.grad``, ``nnx.scan`` / ``nnx.vmap`` over stacked layers,
``nnx.remat``) then carry and slice the adapters together with their kernels, as ``nn.scan`` does on linen.

How they run: registered linear classes get a method hook on ``__call__``: ``nnx.Linear``, ``nnx.LinearGeneral`` and
``nnx.Einsum`` when this module is imported (so a graph rebuilt by ``nnx.merge`` runs its adapters), user classes when
a model holding one is wrapped or updated.
A module without a slot and without an NF4 kernel runs its own ``__call__`` untouched; an adapted one runs its own
``__call__`` for the base output and adds the adapter with ``jgoat.apply.adapted_output`` — the function linen's
interceptor runs, so every method's forward (GOAT, LoRA family, DoRA, KaSA, GoRA, LoRI, IA³) is the one in
``jgoat.adapters``. The base params are never written: the kernels stay bit-identical.

The rest of jgoat works on `params(model)`, the linen-layout tree of the model (base params plus adapter nodes under
``jgoat``), and `update(model, tree)` writes such a tree back: `merge`, `unmerge`, `save`, `restore`, `quantize_nf4`
and `summary` here are those two plus the linen functions; ``export_peft`` / ``export_goat`` take ``params(model)``
and ``update(model, jgoat.import_peft(jgoat.nnx.params(model), dir))`` imports.

Not on NNX (clear errors): prompt / prefix tuning and bottleneck adapters (they need jgoat's own models' hook
points), ``modules_to_save`` (put those params in ``wrt``) and named adapters.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jgoat.adapters import ADAPTER_TYPES, AdapterConfig, GoatAdapter
from jgoat.apply import adapted_output, einsum_n_in, linear_n_in, register_linear
from jgoat.checkpoint import restore as restore_tree
from jgoat.checkpoint import save as save_tree
from jgoat.core import ADAPTER_KEY, Layout, is_module, iter_modules, path_str, select_targets, to_dict
from jgoat.errors import JgoatError
from jgoat.quant import NF4Kernel, dequantize
from jgoat.quant import quantize_nf4 as quantize_tree
from jgoat.wrap import merge as merge_tree
from jgoat.wrap import summary as summary_tree
from jgoat.wrap import unmerge as unmerge_tree
from jgoat.wrap import wrap as wrap_tree

PyTree = Any

register_linear(nnx.Linear)
register_linear(nnx.LinearGeneral, n_in=lambda module: len(module.axis))
register_linear(nnx.Einsum, n_in=einsum_n_in)


class Adapter(nnx.LoRAParam):
    """A trainable adapter array (A, B, GOAT's router, DoRA's magnitude, IA³'s scale ...)."""


class AdapterConst(nnx.Variable):
    """A frozen adapter array: residual offsets of SVD inits, LoRI masks, GoRA ranks and scales."""


class AdapterAux(nnx.Variable):
    """A per-layer accumulator written by the forward pass: GOAT's aux loss [*L] and expert load [*L, E]."""


@dataclasses.dataclass(frozen=True)
class _Run:
    token_mask: jax.Array | None = None
    collect_load: bool = False


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("jgoat_nnx_run", default=None)
_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("jgoat_nnx_active", default=frozenset())


def _array_fields(adapter) -> list[str]:
    return [f.name for f in dataclasses.fields(adapter)
            if f.metadata.get("pytree_node", True) and getattr(adapter, f.name) is not None]


def _static(adapter) -> tuple[tuple[str, Any], ...]:
    return tuple((f.name, getattr(adapter, f.name)) for f in dataclasses.fields(adapter)
                 if not f.metadata.get("pytree_node", True))


def _stack_shape(adapter) -> tuple[int, ...]:
    ref = getattr(adapter, getattr(adapter, "ref_field", "A"))
    return tuple(ref.shape[: ref.ndim - adapter.layer_ndim])


class AdapterSlot(nnx.Module):
    """The adapter of one module, as NNX state: one variable per array field of the adapter node (trainable fields
    `Adapter`, the others `AdapterConst`), its static knobs, and `AdapterAux` accumulators."""

    def __init__(self, adapter, path: str, rngs: nnx.Rngs | None = None):
        self.path = path
        self.kind = type(adapter)
        self.static = _static(adapter)
        self.fields = tuple(_array_fields(adapter))
        for name in self.fields:
            kind = Adapter if name in adapter.trainable else AdapterConst
            setattr(self, name, kind(getattr(adapter, name)))
        stack = _stack_shape(adapter)
        self.aux = AdapterAux(jnp.zeros(stack, jnp.float32))
        if isinstance(adapter, GoatAdapter):
            self.load = AdapterAux(jnp.zeros((*stack, adapter.router.shape[-1]), jnp.float32))
        self.rngs = rngs if adapter.dropout > 0 else None
        self.deterministic = False

    def node(self):
        """The adapter node (the pytree ``jgoat.wrap`` puts in a linen tree) these variables hold."""
        return self.kind(**{name: getattr(self, name).get_value() for name in self.fields}, **dict(self.static))

    def matches(self, adapter) -> bool:
        return (type(adapter) is self.kind and _static(adapter) == self.static
                and tuple(_array_fields(adapter)) == self.fields
                and all(getattr(adapter, n).shape == getattr(self, n).get_value().shape for n in self.fields))

    def assign(self, adapter) -> None:
        for name in self.fields:
            getattr(self, name).set_value(getattr(adapter, name))


def _input(args, kwargs):
    return args[0] if args else kwargs["inputs"]


def _hooked(call):
    """`call` (a linear class's ``__call__``) with the module's adapter and NF4 kernel live."""

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        slot = vars(self).get(ADAPTER_KEY)
        kernel_var = vars(self).get("kernel")
        node = kernel_var.get_raw_value() if isinstance(kernel_var, nnx.Variable) else None
        if id(self) in _ACTIVE.get() or not (isinstance(slot, AdapterSlot) or isinstance(node, NF4Kernel)):
            return call(self, *args, **kwargs)
        token = _ACTIVE.set(_ACTIVE.get() | {id(self)})
        try:
            if isinstance(node, NF4Kernel):  # the module's own __call__ on this call's dequantised kernel
                path = slot.path if isinstance(slot, AdapterSlot) else type(self).__name__
                if node.codes.ndim != 1:
                    raise JgoatError(f"NF4 kernel at '{path}' has {node.codes.ndim - 1} stacked layer axes but the "
                                     "module is not called inside nnx.scan / nnx.vmap over them")
                kernel = dequantize(node)
                kernel_var.set_raw_value(kernel)
                try:
                    y = call(self, *args, **kwargs)
                finally:
                    kernel_var.set_raw_value(node)
            else:
                kernel = node
                y = call(self, *args, **kwargs)
            if not isinstance(slot, AdapterSlot):
                return y
            run = _RUN.get() or _Run()
            adapter = slot.node()
            bias_var = vars(self).get("bias")
            bias = bias_var.get_value() if isinstance(bias_var, nnx.Variable) else None
            rng = slot.rngs.dropout() if slot.rngs is not None and not slot.deterministic else None
            y, aux, load = adapted_output(adapter, _input(args, kwargs), y, kernel=kernel, bias=bias, rng=rng,
                                          token_mask=run.token_mask, path=slot.path,
                                          collect_load=run.collect_load)
            if aux is not None:
                slot.aux.set_value(slot.aux.get_value() + aux)
            if load is not None:
                slot.load.set_value(load)
            return y
        finally:
            _ACTIVE.reset(token)

    __call__.__jgoat_hook__ = True
    return __call__


def _install(cls: type) -> None:
    """Hook the ``__call__`` that `cls` runs (on the class defining it), once."""
    owner = next(c for c in cls.__mro__ if "__call__" in vars(c))
    if not getattr(vars(owner)["__call__"], "__jgoat_hook__", False):
        owner.__call__ = _hooked(vars(owner)["__call__"])


for _cls in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum):
    _install(_cls)


def _modules(model: nnx.Module) -> dict[tuple[str, ...], nnx.Module]:
    """{path: module} of the model's own modules (adapter slots left out)."""
    return {tuple(str(k) for k in path): module for path, module in nnx.iter_modules(model)
            if not isinstance(module, AdapterSlot)}


def _slots(model: nnx.Module) -> list[AdapterSlot]:
    return [module for _, module in nnx.iter_modules(model) if isinstance(module, AdapterSlot)]


def _check_model(model) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"jgoat.nnx takes an nnx.Module, got {type(model).__name__}; for a linen params tree use "
                        "jgoat.wrap / jgoat.apply")


def _layer_ndim(module, n_in: int) -> int | None:
    """ndim of one layer's kernel, or None for a layout jgoat cannot adapt (LinearGeneral with batch axes)."""
    if isinstance(module, nnx.LinearGeneral):
        return None if module.batch_axis else len(module.in_features) + len(module.out_features)
    if isinstance(module, nnx.Einsum):
        return len(module.kernel_shape)
    return n_in + 1


def layouts(model: nnx.Module) -> dict[str, Layout]:
    """The exact `Layout` of every linear-like module of `model` (what ``jgoat.probe`` measures on linen): read from
    the module's own attributes, its stacked-layer axes from the kernel's extra leading dims (``nnx.vmap``-created
    layers)."""
    _check_model(model)
    found = {}
    for path, module in _modules(model).items():
        n_in = linear_n_in(module)
        kernel = vars(module).get("kernel")
        if n_in is None or not isinstance(kernel, nnx.Variable):
            continue
        value = kernel.get_raw_value()
        if isinstance(value, NF4Kernel):
            found[path_str(path)] = value.layout
            continue
        per_layer = _layer_ndim(module, n_in)
        if per_layer is not None and value.ndim >= per_layer:
            found[path_str(path)] = Layout(n_stack=value.ndim - per_layer, n_in=n_in)
    return found


def params(model: nnx.Module) -> dict:
    """The model as a linen-layout params tree: nested dicts of its ``nnx.Param`` arrays (NF4 kernels as
    `NF4Kernel` nodes) with each adapter node under ``module["jgoat"]`` — what ``jgoat.wrap`` gives on linen.

    Every tree function of jgoat takes it: ``jgoat.summary``, ``save``, ``export_peft``, ``export_goat``,
    ``fingerprint``, ``merge``. The arrays are the model's own (no copy).
    """
    _check_model(model)
    tree: dict = {}

    def put(keys, value):
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    for path, node in nnx.iter_graph(model):
        keys = tuple(str(k) for k in path)
        if isinstance(node, AdapterSlot):
            put(keys, node.node())
        elif isinstance(node, nnx.Param) and ADAPTER_KEY not in keys and keys:
            put(keys, node.get_raw_value())
    return tree


def update(model: nnx.Module, tree: PyTree, *, rngs: nnx.Rngs | None = None) -> None:
    """Write a linen-layout tree (as `params` gives, after any jgoat tree function) into `model`, in place.

    Base params whose value changed are set (a merged or NF4-quantised kernel); each module's adapter becomes the
    tree's: added, replaced (in place when method, knobs and shapes match, so variables keep their identity) or
    removed. `rngs` (a ``'dropout'`` stream) drives adapter dropout for adapters with dropout > 0.
    """
    _check_model(model)
    modules = _modules(model)
    tree = to_dict(tree)
    for path, entry in iter_modules(tree):
        module = modules.get(path)
        if module is None:
            raise JgoatError(f"the tree has a module '{path_str(path)}' that the model does not have: update takes "
                             "a tree of this model (jgoat.nnx.params(model) after jgoat functions)")
        for name, value in entry.items():
            if name == ADAPTER_KEY or is_module(value):
                continue
            var = vars(module).get(name)
            if not isinstance(var, nnx.Variable):
                raise JgoatError(f"the tree has a param '{path_str((*path, name))}' that the model does not have")
            if var.get_raw_value() is not value:
                _check_hookable(module, path, "an NF4 kernel" if isinstance(value, NF4Kernel) else None)
                var.set_raw_value(value)
        _update_slot(module, path, entry.get(ADAPTER_KEY), rngs)


def _check_hookable(module, path, what: str | None) -> None:
    if what is None:
        return
    if linear_n_in(module) is None:
        raise JgoatError(f"module '{path_str(path)}' is a {type(module).__qualname__}, which jgoat cannot intercept "
                         f"to run {what}: if its __call__(x) returns x·kernel (+ bias), register it with "
                         "jgoat.register_linear(cls, n_in=...)")
    _install(type(module))


def _update_slot(module, path, adapter, rngs) -> None:
    slot = vars(module).get(ADAPTER_KEY)
    if slot is not None and not isinstance(slot, AdapterSlot):
        raise JgoatError(f"module '{path_str(path)}' has its own attribute {ADAPTER_KEY!r}, where jgoat.nnx keeps "
                         "adapters")
    if adapter is None:
        if slot is not None:
            delattr(module, ADAPTER_KEY)
        return
    if isinstance(adapter, Mapping):
        raise JgoatError(f"module '{path_str(path)}' holds named adapters {sorted(adapter)}: named adapters are not "
                         "supported on NNX yet; pass jgoat.select_adapter(tree, name)")
    if not isinstance(adapter, ADAPTER_TYPES):
        raise JgoatError(f"module '{path_str(path)}' is marked modules_to_save: on NNX select its params in "
                         "nnx.Optimizer's wrt instead, e.g. wrt=nnx.Any(jgoat.nnx.Adapter, nnx.PathContains(name))")
    _check_hookable(module, path, "an adapter")
    if slot is not None and slot.matches(adapter) and (rngs is None or slot.rngs is rngs):
        slot.assign(adapter)
        return
    if adapter.dropout > 0 and rngs is None and (slot is None or slot.rngs is None):
        raise JgoatError(f"the adapter at '{path_str(path)}' has dropout {adapter.dropout}: pass "
                         "rngs=nnx.Rngs(dropout=key) (model.eval() then turns dropout off)")
    setattr(module, ADAPTER_KEY, AdapterSlot(adapter, path_str(path), rngs if rngs is not None else slot.rngs
                                             if slot is not None else None))


def wrap(model: nnx.Module, cfg: AdapterConfig, *, key: jax.Array, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Add an adapter to every linear module of an NNX model that `cfg` targets, in place; returns `model`.

    Same configs, target rules (over the NNX module paths, e.g. ``layers/0/attn/q_proj``) and errors as
    ``jgoat.wrap``, and the same adapter arrays: an NNX model and a linen model with the same module paths and
    weights get equal adapters from the same key. Stacked layers (built with ``nnx.vmap``) get stacked adapters.

    Args:
      model: an ``nnx.Module`` without jgoat adapters (it may hold NF4 kernels from `quantize_nf4`).
      cfg: a linear-adapter config (``GoatConfig``, ``LoraConfig`` incl. DoRA / PiSSA, ``IA3Config``, ...).
      key: PRNG key of the random parts of the init.
      rngs: an ``nnx.Rngs`` with a ``'dropout'`` stream, needed when ``cfg.dropout > 0``.

    Example:
      >>> jgoat.nnx.wrap(model, jgoat.LoraConfig(rank=8, targets=["q_proj", "v_proj"]), key=jax.random.key(0))
    """
    _check_model(model)
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"jgoat.nnx.wrap adds linear adapters (LoraConfig, GoatConfig, ...), got "
                        f"{type(cfg).__name__}: prompt/prefix tuning and bottleneck adapters change the model graph "
                        "and need the hook points of jgoat's own (linen) models (jgoat.models)")
    if cfg.modules_to_save:
        raise JgoatError(f"modules_to_save={cfg.modules_to_save!r}: on NNX, train those params by selecting them in "
                         "nnx.Optimizer's wrt, e.g. wrt=nnx.Any(jgoat.nnx.Adapter, nnx.PathContains('classifier'))")
    existing = _slots(model)
    if existing:
        raise JgoatError(f"the model already holds jgoat adapters (e.g. at '{existing[0].path}'): wrap a model "
                         "once (jgoat.nnx.merge(model) gives a plain model back)")
    tree = params(model)
    found = layouts(model)
    modules = _modules(model)
    for path in select_targets(tree, cfg, found):
        if path_str(path) not in found:
            module = modules[path]
            raise JgoatError(f"module '{path_str(path)}' is a {type(module).__qualname__}, which jgoat cannot "
                             "intercept: if its __call__(x) returns x·kernel (+ bias), register it with "
                             "jgoat.register_linear(cls, n_in=...); otherwise exclude it from the targets")
    update(model, wrap_tree(tree, cfg, key=key, layouts=found), rngs=rngs)
    return model


def apply(model: nnx.Module, *args, method: str | None = None, aux_mask: jax.Array | None = None,
          collect_load: bool = False, **kwargs) -> tuple[Any, ...]:
    """Call the model (``model(*args, **kwargs)``, or ``getattr(model, method)``) and return ``(output, aux)``.

    ``aux`` is GOAT's auxiliary load-balancing loss summed over every GOAT layer and call (0.0 without GOAT), read
    from the layers' `AdapterAux` accumulators, which are zeroed before and after the call: the model's ``__call__``
    never threads it. Works under ``nnx.jit`` / ``nnx.grad`` and with layers run by ``nnx.scan`` / ``nnx.vmap`` /
    ``nnx.remat`` inside the model. A plain ``model(x)`` runs the adapters too (the accumulators then keep the aux).

    Args:
      aux_mask: optional {0,1} array over the token dims of the linear inputs ([batch, seq]): padding is left out
        of the aux loss, as in ``jgoat.apply``.
      collect_load: also return {module path: expert load [*L, E]} for every GOAT layer (last call's).
    """
    slots = _slots(model)
    for slot in slots:
        _zero(slot)
    token = _RUN.set(_Run(aux_mask, collect_load))
    try:
        out = (model if method is None else getattr(model, method))(*args, **kwargs)
    finally:
        _RUN.reset(token)
    aux = sum((jnp.sum(slot.aux.get_value()) for slot in slots), jnp.zeros((), jnp.float32))
    loads = {slot.path: slot.load.get_value() for slot in slots if hasattr(slot, "load")}
    for slot in slots:
        _zero(slot)
    return (out, aux, loads) if collect_load else (out, aux)


def _zero(slot: AdapterSlot) -> None:
    slot.aux.set_value(jnp.zeros_like(slot.aux.get_value()))
    if hasattr(slot, "load"):
        slot.load.set_value(jnp.zeros_like(slot.load.get_value()))


def merge(model: nnx.Module) -> nnx.Module:
    """A new model with every mergeable adapter folded into its kernel (``jgoat.merge``) and no adapters; `model`
    is left as it is. GOAT raises (its routing depends on the input)."""
    merged = nnx.clone(model)
    update(merged, merge_tree(params(model), layouts=layouts(model)))
    return merged


def unmerge(merged: nnx.Module, wrapped: nnx.Module) -> nnx.Module:
    """A new model: `merged`'s kernels minus the adapters of `wrapped` (``jgoat.unmerge``), with those adapters."""
    out = nnx.clone(merged)
    update(out, unmerge_tree(params(merged), params(wrapped), layouts=layouts(wrapped)))
    return out


def quantize_nf4(model: nnx.Module, **kwargs) -> nnx.Module:
    """QLoRA: store the targeted linear kernels of `model` as NF4 in place (``jgoat.quantize_nf4``'s arguments;
    do it before `wrap`); each is dequantised at its own call. Returns `model`."""
    _check_model(model)
    update(model, quantize_tree(params(model), layouts=layouts(model), **kwargs))
    return model


def summary(model: nnx.Module) -> str:
    """``jgoat.summary`` of the model: trainable vs total parameters per family."""
    return summary_tree(params(model))


def _opt_state(optimizer) -> PyTree:
    return None if optimizer is None else nnx.state(optimizer, nnx.OptState)


def save(directory: str | os.PathLike, model: nnx.Module, *, step: int, optimizer: nnx.Optimizer | None = None,
         metadata: Mapping[str, Any] | None = None, max_to_keep: int | None = 3) -> None:
    """``jgoat.save`` of the model's adapters (and the optimizer's state), bound to the base fingerprint."""
    save_tree(directory, params(model), step=step, opt_state=_opt_state(optimizer), metadata=metadata,
                    max_to_keep=max_to_keep)


def restore(directory: str | os.PathLike, model: nnx.Module, *, step: int | None = None,
            optimizer: nnx.Optimizer | None = None) -> dict[str, Any]:
    """Put saved adapters (and optimizer state) into a model wrapped as at save time, in place; returns the record.

    Refuses a different base (fingerprint) or adapter layout, as ``jgoat.restore``.
    """
    tree, opt_state, record = restore_tree(directory, params(model), step=step,
                                                 opt_state=_opt_state(optimizer))
    update(model, tree)
    if optimizer is not None:
        nnx.update(optimizer, opt_state)
    return record
