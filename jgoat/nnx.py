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

Named adapters (``wrap(..., name=...)``) live at ``.../up/jgoat/<name>/A`` (a `NamedSlots` module holding one
`AdapterSlot` per name); `apply` runs one (``adapter=name``) or one per example (``adapter=(names...)``,
``adapter_ids=ids``), and ``trainable(name)`` is the ``wrt`` filter that trains only that one. ``modules_to_save``
makes every ``nnx.Param`` of those modules a `SavedParam` (an `Adapter`, so ``wrt=jgoat.nnx.Adapter`` trains them
and `save` stores them) and marks the module with a `SaveMarker`; `merge` turns them back into ``nnx.Param``.

A linear class whose weight attribute is not ``kernel`` (tunix's ``Einsum`` holds ``w``) is registered with
`register` (``kernel="w"``); in `params` its weight appears as ``kernel``, like every other.

Not on NNX (clear errors): prompt / prefix tuning and bottleneck adapters (they need jgoat's own models' hook
points), and modules of a linen model converted with ``nnx.bridge.ToNNX`` (linen code runs inside; wrap the linen
params with ``jgoat.wrap`` and run ``jgoat.apply``, or write the model in NNX).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge

from jgoat.adapters import ADAPTER_TYPES, AdapterConfig, GoatAdapter
from jgoat.apply import (
    adapted_output,
    adapted_output_per_example,
    adapter_choice,
    check_selection,
    einsum_n_in,
    linear_n_in,
    register_linear,
)
from jgoat.checkpoint import restore as restore_tree
from jgoat.checkpoint import save as save_tree
from jgoat.core import (
    ADAPTER_KEY,
    Layout,
    TrainModule,
    check_name,
    is_module,
    iter_modules,
    map_slots,
    path_str,
    rule_matches,
    select_targets,
    slot_names,
    to_dict,
)
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

_KERNEL_NAMES: dict[type, str] = {}  # NNX classes registered with a weight attribute other than ``kernel``


def register(cls: type, *, n_in=None, kernel: str = "kernel") -> None:
    """`jgoat.register_linear` for an NNX class whose ``__call__(x)`` returns ``x · weight (+ bias)``, with the
    weight in attribute `kernel` (e.g. tunix's ``Einsum``, weight ``w``); in `params` it appears as ``kernel``.

    Args:
      n_in: given a module, how many trailing input dims the weight contracts (default 1; ``jgoat.nnx.einsum_n_in``
        for a class with an ``einsum_str``, whose per-layer weight ndim is then read from that string).
      kernel: the name of the weight attribute (an ``nnx.Param``).
    """
    register_linear(cls, **({} if n_in is None else {"n_in": n_in}))
    _KERNEL_NAMES[cls] = kernel


def _kernel_name(module) -> str:
    return next((_KERNEL_NAMES[c] for c in type(module).__mro__ if c in _KERNEL_NAMES), "kernel")


class Adapter(nnx.LoRAParam):
    """A trainable adapter array (A, B, GOAT's router, DoRA's magnitude, IA³'s scale ...)."""


class AdapterConst(nnx.Variable):
    """A frozen adapter array: residual offsets of SVD inits, LoRI masks, GoRA ranks and scales."""


class AdapterAux(nnx.Variable):
    """A per-layer accumulator written by the forward pass: GOAT's aux loss [*L] and expert load [*L, E]."""


class SavedParam(Adapter):
    """A base param of a ``modules_to_save`` module: trained in full (an `Adapter`, so ``wrt=jgoat.nnx.Adapter``
    trains it) and saved with the adapters."""


@dataclasses.dataclass(frozen=True)
class _Run:
    token_mask: jax.Array | None = None
    collect_load: bool = False
    choice: tuple[str | None, ...] | None = None  # the named adapters this call runs (None: unnamed ones)
    ids: jax.Array | None = None  # per-example indices into `choice`


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

    def __init__(self, adapter, path: str, rngs: nnx.Rngs | None = None, name: str | None = None):
        self.path = path
        self.name = name
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


class NamedSlots(nnx.Module):
    """The named adapters of one module: an `AdapterSlot` attribute per name, and the aux accumulator of the call."""

    def __init__(self, path: str, stack: tuple[int, ...]):
        self.path = path
        self.aux = AdapterAux(jnp.zeros(stack, jnp.float32))

    def slots(self) -> dict[str, AdapterSlot]:
        return {name: slot for name, slot in vars(self).items() if isinstance(slot, AdapterSlot)}


class SaveMarker(nnx.Module):
    """Marks a ``modules_to_save`` module (linen's ``TrainModule``): its params are `SavedParam`."""


_JGOAT_NODES = (AdapterSlot, NamedSlots, SaveMarker)
_RESERVED = frozenset(dir(NamedSlots)) | {"path", "aux"}


def _input(args, kwargs):
    return args[0] if args else kwargs["inputs"]


def _hooked(call):
    """`call` (a linear class's ``__call__``) with the module's adapter and NF4 kernel live."""

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        slot = vars(self).get(ADAPTER_KEY)
        kernel_var = vars(self).get(_kernel_name(self))
        node = kernel_var.get_raw_value() if isinstance(kernel_var, nnx.Variable) else None
        live = isinstance(slot, AdapterSlot | NamedSlots)
        if id(self) in _ACTIVE.get() or not (live or isinstance(node, NF4Kernel)):
            return call(self, *args, **kwargs)
        token = _ACTIVE.set(_ACTIVE.get() | {id(self)})
        try:
            if isinstance(node, NF4Kernel):  # the module's own __call__ on this call's dequantised kernel
                path = slot.path if live else type(self).__name__
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
            if not live:
                return y
            bias_var = vars(self).get("bias")
            bias = bias_var.get_value() if isinstance(bias_var, nnx.Variable) else None
            return _adapt(slot, _RUN.get() or _Run(), _input(args, kwargs), y, kernel, bias)
        finally:
            _ACTIVE.reset(token)

    __call__.__jgoat_hook__ = True
    return __call__


def _dropout_key(slots: list) -> jax.Array | None:
    slot = next((s for s in slots if s is not None and s.rngs is not None and not s.deterministic), None)
    return None if slot is None else slot.rngs.dropout()


def _adapt(slot: AdapterSlot | NamedSlots, run: _Run, x, y, kernel, bias):
    """The module's output `y` plus its adapter (unnamed, or the run's named choice); accumulates aux and load."""
    kw = {"kernel": kernel, "bias": bias, "token_mask": run.token_mask, "path": slot.path,
          "collect_load": run.collect_load}
    if isinstance(slot, AdapterSlot):
        y, aux, load = adapted_output(slot.node(), x, y, rng=_dropout_key([slot]), **kw)
        loads = [] if load is None else [(slot, load)]
    else:
        if run.choice is None:
            raise JgoatError(f"module '{slot.path}' holds named adapters {sorted(slot.slots())}: run the model with "
                             "jgoat.nnx.apply(model, ..., adapter=name), or adapter=(names...) and adapter_ids=ids")
        subs = [None if n is None else slot.slots().get(n) for n in run.choice]
        if all(s is None for s in subs):
            return y
        rng = _dropout_key(subs)
        if run.ids is None:
            sub = next(s for s in subs if s is not None)
            y, aux, load = adapted_output(sub.node(), x, y, rng=rng, **kw)
            loads = [] if load is None else [(sub, load)]
        else:
            y, aux, by_name = adapted_output_per_example([None if s is None else s.node() for s in subs], run.choice,
                                                         run.ids, x, y, rng=rng, **kw)
            loads = [(slot.slots()[n], load) for n, load in by_name.items()]
    if aux is not None:
        slot.aux.set_value(slot.aux.get_value() + aux)
    for sub, load in loads:
        sub.load.set_value(load)
    return y


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
            if ADAPTER_KEY not in (str(k) for k in path) and not isinstance(module, _JGOAT_NODES)}


def _slots(model: nnx.Module) -> list[AdapterSlot]:
    """Every `AdapterSlot` (unnamed, or one name of a `NamedSlots`)."""
    return [module for _, module in nnx.iter_modules(model) if isinstance(module, AdapterSlot)]


def _accumulators(model: nnx.Module) -> list[AdapterSlot | NamedSlots]:
    return [module for _, module in nnx.iter_modules(model) if isinstance(module, AdapterSlot | NamedSlots)]


def _check_model(model) -> None:
    if isinstance(model, nnx.State):
        raise TypeError("jgoat.nnx got an nnx.State alone, which does not say which modules are linear (nor where a "
                        "hook runs): pass the model, or the whole result of nnx.split(model) as a tuple "
                        "(graphdef, state, ...)")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"jgoat.nnx takes an nnx.Module, got {type(model).__name__}; for a linen params tree use "
                        "jgoat.wrap / jgoat.apply")
    bridged = next((path for path, m in nnx.iter_modules(model) if isinstance(m, bridge.ToNNX)), None)
    if bridged is not None:
        raise JgoatError(f"module '{path_str(tuple(str(k) for k in bridged)) or '(root)'}' is a linen module "
                         "converted with nnx.bridge.ToNNX: its layers run as linen code, which jgoat.nnx cannot "
                         "intercept. Wrap its linen params with jgoat.wrap and run jgoat.apply(module.apply), or "
                         "write the model in NNX (nnx.Linear ...)")


def _layer_ndim(module, n_in: int) -> int | None:
    """ndim of one layer's kernel, or None for a layout jgoat cannot adapt (LinearGeneral with batch axes)."""
    if isinstance(module, nnx.LinearGeneral):
        return None if module.batch_axis else len(module.in_features) + len(module.out_features)
    if isinstance(module, nnx.Einsum):
        return len(module.kernel_shape)
    einsum = getattr(module, "einsum_str", None)
    if isinstance(einsum, str):  # an einsum-like registered class: one layer's weight has the rhs operand's dims
        return len(einsum.replace(" ", "").split(",")[1].split("->")[0])
    return n_in + 1


def layouts(model: nnx.Module) -> dict[str, Layout]:
    """The exact `Layout` of every linear-like module of `model` (what ``jgoat.probe`` measures on linen): read from
    the module's own attributes, its stacked-layer axes from the kernel's extra leading dims (``nnx.vmap``-created
    layers)."""
    _check_model(model)
    found = {}
    for path, module in _modules(model).items():
        n_in = linear_n_in(module)
        kernel = vars(module).get(_kernel_name(module))
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
        elif isinstance(node, SaveMarker):
            put(keys, TrainModule())
        elif isinstance(node, nnx.Param) and ADAPTER_KEY not in keys and keys:
            put(keys, node.get_raw_value())
    for path, module in _modules(model).items():  # a registered weight attribute other than `kernel`: as `kernel`
        name = _kernel_name(module)
        if name != "kernel" and isinstance(vars(module).get(name), nnx.Param):
            entry = functools.reduce(lambda node, k: node[k], path, tree)
            entry["kernel"] = entry.pop(name)
    return tree


def update(model: nnx.Module, tree: PyTree, *, rngs: nnx.Rngs | None = None) -> None:
    """Write a linen-layout tree (as `params` gives, after any jgoat tree function) into `model`, in place.

    Base params whose value changed are set (a merged or NF4-quantised kernel); each module's adapter (or named
    adapters) becomes the tree's: added, replaced (in place when method, knobs and shapes match, so variables keep
    their identity) or removed; the params of modules the tree marks ``modules_to_save`` become `SavedParam`, the
    others ``nnx.Param``. `rngs` (a ``'dropout'`` stream) drives adapter dropout for adapters with dropout > 0.
    """
    _check_model(model)
    modules = _modules(model)
    tree = to_dict(tree)
    saved = []
    for path, entry in iter_modules(tree):
        module = modules.get(path)
        if module is None:
            raise JgoatError(f"the tree has a module '{path_str(path)}' that the model does not have: update takes "
                             "a tree of this model (jgoat.nnx.params(model) after jgoat functions)")
        for name, value in entry.items():
            if name == ADAPTER_KEY or is_module(value):
                continue
            var = vars(module).get(_kernel_name(module) if name == "kernel" else name)
            if not isinstance(var, nnx.Variable):
                raise JgoatError(f"the tree has a param '{path_str((*path, name))}' that the model does not have")
            if var.get_raw_value() is not value:
                _check_hookable(module, path, "an NF4 kernel" if isinstance(value, NF4Kernel) else None)
                var.set_raw_value(value)
        slot = entry.get(ADAPTER_KEY)
        if isinstance(slot, TrainModule):
            saved.append(path)
        _update_slot(module, path, slot, rngs)
    for path, module in modules.items():  # modules_to_save: SavedParam exactly under the marked modules
        train = any(path[: len(p)] == p for p in saved)
        for name, var in list(vars(module).items()):
            if type(var) is (nnx.Param if train else SavedParam):  # a user's own Param subclasses stay as they are
                kind = SavedParam if train else nnx.Param
                setattr(module, name, kind(var.get_raw_value(), **var.get_metadata()))


def _check_hookable(module, path, what: str | None) -> None:
    if what is None:
        return
    if linear_n_in(module) is None:
        raise JgoatError(f"module '{path_str(path)}' is a {type(module).__qualname__}, which jgoat cannot intercept "
                         f"to run {what}: if its __call__(x) returns x·kernel (+ bias), register it with "
                         "jgoat.register_linear(cls, n_in=...) (jgoat.nnx.register(cls, kernel=name) for a weight "
                         "not named 'kernel')")
    _install(type(module))


def _update_slot(module, path, adapter, rngs) -> None:
    slot = vars(module).get(ADAPTER_KEY)
    if slot is not None and not isinstance(slot, _JGOAT_NODES):
        raise JgoatError(f"module '{path_str(path)}' has its own attribute {ADAPTER_KEY!r}, where jgoat.nnx keeps "
                         "adapters")
    if adapter is None:
        if slot is not None:
            delattr(module, ADAPTER_KEY)
    elif isinstance(adapter, TrainModule):
        if not isinstance(slot, SaveMarker):
            setattr(module, ADAPTER_KEY, SaveMarker())
    elif isinstance(adapter, Mapping):
        named = slot if isinstance(slot, NamedSlots) else None
        if named is None:
            named = NamedSlots(path_str(path), _stack_shape(next(iter(adapter.values()))))
        current = named.slots()
        for name in current:
            if name not in adapter:
                delattr(named, name)
        for name, node in adapter.items():
            if name in _RESERVED:
                raise JgoatError(f"adapter name {name!r} is reserved on NNX (an attribute of jgoat.nnx.NamedSlots); "
                                 "choose another name")
            new = _slot_for(module, path, node, current.get(name), rngs, name)
            if new is not current.get(name):
                setattr(named, name, new)
        if named is not slot:
            setattr(module, ADAPTER_KEY, named)
    else:
        new = _slot_for(module, path, adapter, slot if isinstance(slot, AdapterSlot) else None, rngs, None)
        if new is not slot:
            setattr(module, ADAPTER_KEY, new)


def _slot_for(module, path, adapter, slot: AdapterSlot | None, rngs, name: str | None) -> AdapterSlot:
    """`slot` holding `adapter` (assigned in place when it matches), or a new `AdapterSlot`."""
    where = f"'{path_str(path)}'" + ("" if name is None else f" (adapter {name!r})")
    if not isinstance(adapter, ADAPTER_TYPES):
        raise JgoatError(f"module {where} holds a {type(adapter).__name__}, not a jgoat adapter node")
    _check_hookable(module, path, "an adapter")
    if slot is not None and slot.matches(adapter) and (rngs is None or slot.rngs is rngs):
        slot.assign(adapter)
        return slot
    if adapter.dropout > 0 and rngs is None and (slot is None or slot.rngs is None):
        raise JgoatError(f"the adapter at {where} has dropout {adapter.dropout}: pass "
                         "rngs=nnx.Rngs(dropout=key) (model.eval() then turns dropout off)")
    return AdapterSlot(adapter, path_str(path), rngs if rngs is not None else slot.rngs if slot is not None else None,
                       name)


def wrap(model, cfg: AdapterConfig, *, key: jax.Array, rngs: nnx.Rngs | None = None, name: str | None = None):
    """Add an adapter to every linear module of an NNX model that `cfg` targets, in place; returns `model`.

    Same configs, target rules (over the NNX module paths, e.g. ``layers/0/attn/q_proj``) and errors as
    ``jgoat.wrap``, and the same adapter arrays: an NNX model and a linen model with the same module paths and
    weights get equal adapters from the same key. Stacked layers (built with ``nnx.vmap``) get stacked adapters.
    ``cfg.modules_to_save`` makes those modules' params `SavedParam` (trained with the adapters).

    Args:
      model: an ``nnx.Module`` without jgoat adapters (it may hold NF4 kernels from `quantize_nf4`), or the tuple
        ``nnx.split(model)`` returns, ``(graphdef, state, ...)``: then the wrapped ``(graphdef, state)`` is returned.
      cfg: a linear-adapter config (``GoatConfig``, ``LoraConfig`` incl. DoRA / PiSSA, ``IA3Config``, ...).
      key: PRNG key of the random parts of the init.
      rngs: an ``nnx.Rngs`` with a ``'dropout'`` stream, needed when ``cfg.dropout > 0``.
      name: add a named adapter beside the model's other named adapters (as ``jgoat.wrap(..., name=...)``); run
        it with ``apply(model, ..., adapter=name)``, train it with ``wrt=jgoat.nnx.trainable(name)``.

    Example:
      >>> jgoat.nnx.wrap(model, jgoat.LoraConfig(rank=8, targets=["q_proj", "v_proj"]), key=jax.random.key(0))
      >>> graphdef, state = jgoat.nnx.wrap(nnx.split(model), cfg, key=key)
    """
    if isinstance(model, tuple) and model and isinstance(model[0], nnx.GraphDef):
        merged = nnx.merge(*model)
        return nnx.split(wrap(merged, cfg, key=key, rngs=rngs, name=name))
    _check_model(model)
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"jgoat.nnx.wrap adds linear adapters (LoraConfig, GoatConfig, ...), got "
                        f"{type(cfg).__name__}: prompt/prefix tuning and bottleneck adapters change the model graph "
                        "and need the hook points of jgoat's own (linen) models (jgoat.models)")
    existing = _slots(model)
    if existing and name is None:
        raise JgoatError(f"the model already holds jgoat adapters (e.g. at '{existing[0].path}'): wrap a model "
                         "once (jgoat.nnx.merge(model) gives a plain model back), or give each adapter a name=...")
    tree = params(model)
    found = layouts(model)
    modules = _modules(model)
    try:
        targets = select_targets(map_slots(tree, lambda slot: None), cfg, found)
    except ValueError:  # a rule naming only modules jgoat cannot intercept: say so, not "matches no linear module"
        targets = [] if cfg.targets == "all-linear" else [
            p for p, m in modules.items() if p and rule_matches(cfg.targets, p)
            and any(isinstance(v, nnx.Param) for v in vars(m).values())]
        if not any(path_str(p) not in found for p in targets):
            raise
    for path in targets:
        if path_str(path) not in found:
            module = modules[path]
            raise JgoatError(f"module '{path_str(path)}' is a {type(module).__qualname__}, which jgoat cannot "
                             "intercept: if its __call__(x) returns x·kernel (+ bias), register it with "
                             "jgoat.register_linear(cls, n_in=...) (jgoat.nnx.register(cls, kernel=name) for a weight "
                             "not named 'kernel'); otherwise exclude it from the targets")
    update(model, wrap_tree(tree, cfg, key=key, layouts=found, name=name), rngs=rngs)
    return model


def apply(model: nnx.Module, *args, method: str | None = None, aux_mask: jax.Array | None = None,
          collect_load: bool = False, adapter: str | Sequence[str | None] | None = None,
          adapter_ids: jax.Array | None = None, **kwargs) -> tuple[Any, ...]:
    """Call the model (``model(*args, **kwargs)``, or ``getattr(model, method)``) and return ``(output, aux)``.

    ``aux`` is GOAT's auxiliary load-balancing loss summed over every GOAT layer and call (0.0 without GOAT), read
    from the layers' `AdapterAux` accumulators, which are zeroed before and after the call: the model's ``__call__``
    never threads it. Works under ``nnx.jit`` / ``nnx.grad`` and with layers run by ``nnx.scan`` / ``nnx.vmap`` /
    ``nnx.remat`` inside the model. A plain ``model(x)`` runs unnamed adapters too (the accumulators then keep the
    aux).

    Args:
      aux_mask: optional {0,1} array over the token dims of the linear inputs ([batch, seq]): padding is left out
        of the aux loss, as in ``jgoat.apply``.
      collect_load: also return {module path: expert load [*L, E]} for every GOAT layer (last call's); keys
        ``path:name`` with per-example selection, as in ``jgoat.apply``.
      adapter, adapter_ids: for named adapters, as in ``jgoat.apply``: ``adapter="a"`` runs that one,
        ``adapter=("a", "b", None)`` with ``adapter_ids`` (ints indexing it, [batch] or [batch, seq]) runs one per
        example (None: the base model). Required when the model holds named adapters.
    """
    choice = adapter_choice(adapter)
    ids = check_selection(params(model), adapter, choice, adapter_ids)
    accumulators = _accumulators(model)
    for acc in accumulators:
        _zero(acc)
    token = _RUN.set(_Run(aux_mask, collect_load, choice, ids))
    try:
        out = (model if method is None else getattr(model, method))(*args, **kwargs)
    finally:
        _RUN.reset(token)
    aux = sum((jnp.sum(acc.aux.get_value()) for acc in accumulators), jnp.zeros((), jnp.float32))
    loads = {}
    for slot in _slots(model):
        if hasattr(slot, "load") and (choice is None or slot.name in choice):
            loads[slot.path if ids is None else f"{slot.path}:{slot.name}"] = slot.load.get_value()
    for acc in accumulators:
        _zero(acc)
    return (out, aux, loads) if collect_load else (out, aux)


def _zero(acc: AdapterSlot | NamedSlots) -> None:
    acc.aux.set_value(jnp.zeros_like(acc.aux.get_value()))
    if hasattr(acc, "load"):
        acc.load.set_value(jnp.zeros_like(acc.load.get_value()))


def trainable(adapter: str | None = None) -> nnx.filterlib.Filter:
    """The NNX filter of what trains (linen's `jgoat.trainable_mask`): for ``wrt=`` of ``nnx.Optimizer``,
    ``nnx.DiffState`` and ``nnx.split`` / ``nnx.state``.

    Without `adapter`: every `Adapter` (unnamed adapters and ``modules_to_save`` params, `SavedParam`). With
    ``adapter=name``: only that named adapter's arrays (other names, the base and modules_to_save stay frozen).
    """
    if adapter is None:
        return Adapter

    def of_adapter(path, value) -> bool:
        return (isinstance(value, Adapter) and not isinstance(value, SavedParam) and len(path) >= 3
                and str(path[-3]) == ADAPTER_KEY and str(path[-2]) == adapter)

    return of_adapter


def split(model: nnx.Module, *, adapter: str | None = None) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trainable, frozen)``: ``nnx.split`` by `trainable` (``adapter=name`` is required for a model
    holding named adapters, as ``jgoat.split``). `combine` is the inverse."""
    names = slot_names(params(model))
    if adapter is None and names:
        raise JgoatError(f"the model holds named adapters {names}: choose the one to train with adapter=...")
    if adapter is not None:
        check_name(adapter, names)
    return nnx.split(model, trainable(adapter), ...)


def combine(graphdef: nnx.GraphDef, trainable_state: nnx.State, frozen: nnx.State) -> nnx.Module:
    """The model `split` took apart (``nnx.merge``)."""
    return nnx.merge(graphdef, trainable_state, frozen)


def merge(model: nnx.Module, *, adapter: str | None = None) -> nnx.Module:
    """A new model with every mergeable adapter (the named `adapter`, for named adapters) folded into its kernel
    (``jgoat.merge``), no adapters and plain ``nnx.Param``; `model` is left as it is. GOAT raises (its routing
    depends on the input)."""
    merged = nnx.clone(model)
    update(merged, merge_tree(params(model), layouts=layouts(model), adapter=adapter))
    return merged


def unmerge(merged: nnx.Module, wrapped: nnx.Module, *, adapter: str | None = None) -> nnx.Module:
    """A new model: `merged`'s kernels minus the adapters of `wrapped` (its named `adapter`, if named;
    ``jgoat.unmerge``), holding those adapters unnamed."""
    out = nnx.clone(merged)
    update(out, unmerge_tree(params(merged), params(wrapped), layouts=layouts(wrapped), adapter=adapter))
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
