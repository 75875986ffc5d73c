"""Run an unmodified linen model with its adapters live: a method interceptor on linear-like modules."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jgoat.adapters import (
    ADAPTER_TYPES,
    GoatAdapter,
    GoraAdapter,
    IA3Adapter,
    KasaAdapter,
    LoraAdapter,
    LoriAdapter,
)
from jgoat.adapters.base import Context
from jgoat.core import ADAPTER_KEY, Layout, check_name, get_at, slot_names
from jgoat.quant import NF4Kernel, linear_base

AUX_COLLECTION = "jgoat_aux"
LOAD_COLLECTION = "jgoat_load"


def _dense_n_in(module: nn.Dense) -> int:
    return 1


def _dense_general_n_in(module: nn.DenseGeneral) -> int:
    return 1 if isinstance(module.axis, int) else len(module.axis)


def _einsum_n_in(module: nn.Einsum) -> int:
    lhs, rest = module.einsum_str.replace(" ", "").split(",")
    rhs, out = rest.split("->")
    contracted = [c for c in rhs if c in lhs and c not in out]
    expected = "".join(contracted) + "".join(c for c in rhs if c in out)
    if rhs != expected or not lhs.endswith("".join(contracted)) or not out.endswith(rhs[len(contracted):]):
        raise ValueError(f"Einsum '{module.einsum_str}' is not linear-like ([..., in] x [in, out] -> [..., out]); "
                         "register a custom class with jgoat.register_linear")
    return len(contracted)


_LINEARS: dict[type, Callable[[nn.Module], int]] = {
    nn.Dense: _dense_n_in,
    nn.DenseGeneral: _dense_general_n_in,
    nn.Einsum: _einsum_n_in,
}


def register_linear(cls: type, *, n_in: Callable[[nn.Module], int] = _dense_n_in) -> None:
    """Declare a user linen class linear-like: ``__call__(x)`` returns ``x ⋅ kernel (+ bias)``.

    Args:
      cls: the module class; it must store its weight as param ``kernel`` of shape [*in_dims, *out_dims] and take
        the input as first positional argument.
      n_in: given a module instance, how many trailing input dims the kernel contracts (default 1).
    """
    _LINEARS[cls] = n_in


def _linear_n_in(module: nn.Module) -> int | None:
    for cls in type(module).__mro__:
        if cls in _LINEARS:
            return _LINEARS[cls](module)
    return None


def _input(args, kwargs):
    return args[0] if args else kwargs["inputs"]


def _flatten_in(x: jax.Array, in_features: int, path: str) -> tuple[jax.Array, tuple[int, ...]]:
    """x [..., *in_dims] -> ([T, in], leading shape), finding how many trailing dims make `in_features`."""
    size = 1
    for j in range(1, x.ndim + 1):
        size *= x.shape[-j]
        if size == in_features:
            return x.reshape(-1, in_features), x.shape[:-j]
    raise ValueError(f"adapter at '{path}' expects {in_features} input features, got input of shape {x.shape}")


def _interceptor(token_mask: jax.Array | None, collect_load: bool, choice: tuple[str | None, ...] | None,
                 ids: jax.Array | None):
    """choice: the named adapters the run may use (None: unnamed adapters); ids: per-example indices into it."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or _linear_n_in(module) is None or module.scope is None:
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
        if isinstance(kernel, NF4Kernel):  # QLoRA: linen can't multiply the node; dequantise this call's W here
            kernel, base = linear_base(module, kernel, _input(args, kwargs))
        else:
            base = functools.partial(next_fun, *args, **kwargs)
        slot = module.get_variable("params", ADAPTER_KEY) if module.has_variable("params", ADAPTER_KEY) else None
        if isinstance(slot, Mapping):  # named adapters: the chosen ones, in `choice` order (None: not here / base)
            chosen = [None if n is None else slot.get(n) for n in choice]
        else:
            chosen = [slot if isinstance(slot, ADAPTER_TYPES) else None]
        if all(a is None for a in chosen):
            return base()
        path = "/".join(module.path)
        for adapter in chosen:
            if adapter is not None:
                _check_stacking(adapter, path)
        y = base()
        x_TxI, lead = _flatten_in(_input(args, kwargs), _first(chosen).in_features, path)
        y_TxO = y.reshape(x_TxI.shape[0], -1)
        ctx = Context(
            kernel_IxO=kernel.reshape(x_TxI.shape[1], -1),
            bias_O=(module.get_variable("params", "bias").reshape(-1)
                    if module.has_variable("params", "bias") else None),
            rng=(module.make_rng("dropout")
                 if any(a is not None and a.dropout > 0 for a in chosen) and module.scope.has_rng("dropout") else None),
            token_mask_T=_mask_for(token_mask, lead, path),
        )
        if ids is None or not isinstance(slot, Mapping):
            y_TxO, aux = _first(chosen).forward(x_TxI, y_TxO, ctx)
            loads = {"load": (_first(chosen), ctx.token_mask_T)}
        else:
            y_TxO, aux, loads = _per_example(chosen, choice, ids, x_TxI, y_TxO, lead, ctx, path)
        if aux is not None:
            module.sow(AUX_COLLECTION, "aux", aux)
        if collect_load:
            for sow_name, (adapter, mask_T) in loads.items():
                if isinstance(adapter, GoatAdapter):
                    module.sow(LOAD_COLLECTION, sow_name, expert_load(adapter, x_TxI, mask_T))
        return y_TxO.reshape(y.shape)

    return intercept


def _first(chosen: list) -> Any:
    return next(a for a in chosen if a is not None)


def _check_stacking(adapter, path: str) -> None:
    ref_ndim = getattr(adapter, getattr(adapter, "ref_field", "A")).ndim  # ref_field: ClassVar, default "A"
    if ref_ndim != adapter.layer_ndim:
        raise ValueError(
            f"adapter at '{path}' has {ref_ndim - adapter.layer_ndim} extra leading axes but the module "
            "is not scanned over them: its kernel was read as stacked layers. Pass "
            "layouts=jgoat.probe(model, params, *inputs) to jgoat.wrap for DenseGeneral/Einsum kernels"
        )


# Methods whose forward is token-local, aux-free and weight-sized-intermediate-free: per-example selection gathers
# each example's adapter and vmaps the method's own forward over examples (punica / S-LoRA's BGMV).
GATHERED = (LoraAdapter, LoriAdapter, KasaAdapter, GoraAdapter, IA3Adapter)


def _signature(adapter) -> tuple:
    """Method, static knobs (scale, dropout, ...) and leaf shapes / dtypes: equal signatures stack."""
    return jax.tree.structure(adapter), [(x.shape, x.dtype) for x in jax.tree.leaves(adapter)]


def _gatherable(adapters: list) -> bool:
    return isinstance(adapters[0], GATHERED) and all(_signature(a) == _signature(adapters[0]) for a in adapters)


def _per_example(chosen: list, choice: tuple, ids: jax.Array, x_TxI: jax.Array, y_TxO: jax.Array,
                 lead: tuple[int, ...], ctx: Context, path: str) -> tuple[jax.Array, jax.Array | None, dict]:
    """Each group of rows (an example, or a token for per-token ids) runs its own adapter.

    ids [*lead[:n]] index `choice`; a None entry (or a name this module lacks) leaves those rows' base output.
    Returns (y_TxO, summed aux or None, {sow name: (adapter, token mask)} for the load statistics).
    """
    if ids.shape != lead[: ids.ndim]:
        raise ValueError(f"adapter_ids of shape {ids.shape} do not match the leading dims {lead} of the input to "
                         f"'{path}': give one id per example ([batch]) or per token ([batch, seq])")
    n_groups = math.prod(ids.shape)
    rows = x_TxI.shape[0] // n_groups
    ids_N = ids.reshape(-1)
    ids_T = jnp.broadcast_to(ids_N[:, None], (n_groups, rows)).reshape(-1)
    present = [a for a in chosen if a is not None]
    if len(present) > 1 and _gatherable(present):  # one adapter: running it on every row costs the same FLOPs
        y_sel_TxO = _gather_forward(chosen, ids_N, x_TxI, y_TxO, ctx)
        aux, loads = None, {}
    else:
        y_sel_TxO, aux, loads = _select_forward(chosen, choice, ids_T, x_TxI, y_TxO, ctx)
    valid_T = (ids_T >= 0) & (ids_T < len(chosen))  # under jit an id out of range cannot raise: its rows are NaN
    return jnp.where(valid_T[:, None], y_sel_TxO, jnp.nan).astype(y_TxO.dtype), aux, loads


def _gather_forward(chosen: list, ids_N: jax.Array, x_TxI: jax.Array, y_TxO: jax.Array, ctx: Context) -> jax.Array:
    """Gather each group's adapter from the stack of `chosen` and vmap its forward over the N groups.

    Cost: one adapter's FLOPs plus N gathered copies of one adapter's params (e.g. N · (in + out) · r for LoRA).
    """
    slots = [k for k, a in enumerate(chosen) if a is not None]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[chosen[k] for k in slots])
    row_K = jnp.asarray([slots.index(k) if k in slots else 0 for k in range(len(chosen))], jnp.int32)
    has_K = jnp.asarray([a is not None for a in chosen])
    safe_N = jnp.clip(ids_N, 0, len(chosen) - 1)
    per_N = jax.tree.map(lambda v: v[row_K[safe_N]], stacked)
    n_groups = ids_N.shape[0]
    x_NxMxI = x_TxI.reshape(n_groups, -1, x_TxI.shape[-1])
    y_NxMxO = y_TxO.reshape(n_groups, -1, y_TxO.shape[-1])

    def one(adapter, x_MxI, y_MxO, rng):
        return adapter.forward(x_MxI, y_MxO, dataclasses.replace(ctx, rng=rng, token_mask_T=None))[0]

    rng_N = None if ctx.rng is None else jax.random.split(ctx.rng, n_groups)
    out_NxMxO = jax.vmap(one, in_axes=(0, 0, 0, None if rng_N is None else 0))(per_N, x_NxMxI, y_NxMxO, rng_N)
    out_NxMxO = jnp.where(has_K[safe_N][:, None, None], out_NxMxO, y_NxMxO)
    return out_NxMxO.reshape(y_TxO.shape)


def _select_forward(chosen: list, choice: tuple, ids_T: jax.Array, x_TxI: jax.Array, y_TxO: jax.Array,
                    ctx: Context) -> tuple[jax.Array, jax.Array | None, dict]:
    """Run every chosen adapter on all rows and keep, per row, its own adapter's output.

    Cost: the sum of the chosen adapters' forwards on the whole batch. GOAT's aux loss and load count each adapter
    over its own rows only (its token mask is the batch's mask restricted to them).
    """
    out_TxO, aux, loads = y_TxO, None, {}
    for k, adapter in enumerate(chosen):
        if adapter is None:
            continue
        mine_T = ids_T == k
        mask_T = mine_T if ctx.token_mask_T is None else jnp.where(mine_T, ctx.token_mask_T, 0)
        y_k, aux_k = adapter.forward(x_TxI, y_TxO, dataclasses.replace(ctx, token_mask_T=mask_T))
        out_TxO = jnp.where(mine_T[:, None], y_k, out_TxO)
        if aux_k is not None:
            aux = aux_k if aux is None else aux + aux_k
        loads[f"load:{choice[k]}"] = (adapter, mask_T)
    return out_TxO, aux, loads


def expert_load(adapter: GoatAdapter, x_TxI: jax.Array, token_mask_T: jax.Array | None) -> jax.Array:
    """Fraction of (unmasked) tokens' top-k slots that go to each expert, [E]; uniform load is 1/E."""
    _, gates_TxE, _ = adapter.route(x_TxI)
    chosen_TxE = (gates_TxE > 0).astype(jnp.float32)
    if token_mask_T is None:
        return jnp.mean(chosen_TxE, axis=0) / adapter.top_k
    m_T = token_mask_T.astype(jnp.float32)
    return jnp.sum(chosen_TxE * m_T[:, None], axis=0) / (jnp.maximum(jnp.sum(m_T), 1.0) * adapter.top_k)


def _mask_for(token_mask, lead: tuple[int, ...], path: str):
    if token_mask is None:
        return None
    if token_mask.shape[: len(lead)] == lead and len(lead) < token_mask.ndim:
        return None  # a reduced input (e.g. a pooler on the first token): every row is a real token
    if token_mask.shape != lead:
        if lead[: token_mask.ndim] != token_mask.shape:
            raise ValueError(f"aux_mask of shape {token_mask.shape} does not match the leading dims {lead} of the "
                             f"input to '{path}'")
        token_mask = jnp.broadcast_to(token_mask.reshape(*token_mask.shape, *([1] * (len(lead) - token_mask.ndim))),
                                      lead)
    return token_mask.reshape(-1)


def adapter_choice(adapter: str | Sequence[str | None] | None) -> tuple[str | None, ...] | None:
    """`adapter` (a name, names per example, or None) as a tuple of names; ValueError for anything else."""
    if adapter is None:
        return None
    choice = (adapter,) if isinstance(adapter, str) else tuple(adapter)
    if not choice or not all(n is None or isinstance(n, str) for n in choice) or all(n is None for n in choice):
        raise ValueError(f"adapter must be a name or a sequence of names (None for the base model), got {adapter!r}")
    return choice


def check_selection(params: Mapping, adapter, choice, adapter_ids) -> jax.Array | None:
    """Validate the adapter choice against the names `params` holds; the per-example ids as an int array or None."""
    names = slot_names(params)
    if choice is None:
        if names:
            raise ValueError(f"params hold named adapters {names}: run one with jgoat.apply(fn, adapter=name), or one "
                             "per example with jgoat.apply(fn, adapter=(name, ...))(..., adapter_ids=ids)")
        if adapter_ids is not None:
            raise ValueError("adapter_ids index the names given as jgoat.apply(fn, adapter=(name, ...))")
        return None
    for name in choice:
        if name is not None:
            check_name(name, names)
    if isinstance(adapter, str):
        if adapter_ids is not None:
            raise ValueError(f"adapter_ids given but adapter={adapter!r} is one name: pass a sequence of names for "
                             "per-example selection")
        return None
    if adapter_ids is None:
        raise ValueError(f"adapter={choice} selects per example: pass adapter_ids (ints indexing it, one per example)")
    ids = jnp.asarray(adapter_ids)
    if ids.ndim == 0 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be an integer array over the batch dims, got {ids.dtype}{ids.shape}")
    if not isinstance(ids, jax.core.Tracer):  # concrete ids are checked here; traced ones give NaN rows (see apply)
        bad = np.asarray(ids)[(np.asarray(ids) < 0) | (np.asarray(ids) >= len(choice))]
        if bad.size:
            raise ValueError(f"adapter_ids must be in [0, {len(choice)}) (indices into adapter={choice}), got "
                             f"{bad[:5].tolist()}")
    return ids


def apply(apply_fn: Callable[..., Any], *, collect_load: bool = False,
          adapter: str | Sequence[str | None] | None = None) -> Callable[..., tuple[Any, ...]]:
    """Wrap a linen ``apply`` so adapters in the params are live; returns ``(output, aux)``.

    ``aux`` is the GOAT auxiliary load-balancing loss summed over all GOAT layers (0.0 without GOAT).
    Adapter dropout is active when a ``'dropout'`` rng is passed (``rngs={'dropout': key}``).

    Named adapters (``jgoat.wrap(..., name=...)``) need `adapter`; running without it is an error, never a sum:
      * ``adapter="task_a"``: only that adapter runs (modules it does not adapt run the base).
      * ``adapter=("task_a", "task_b", None)``: per-example selection; the call then takes ``adapter_ids``, ints
        indexing this tuple (None: the base model) over the leading dims of the linear inputs: [batch] (one adapter
        per example) or [batch, seq] (per token). Each example's output equals running it alone with its adapter.
        When every adapter chosen at a module has the same LoRA-like method (LoRA, LoRI, KaSA, GoRA, IA³), static
        knobs (alpha, dropout) and shapes, each example's adapter is gathered and the method's forward vmapped over
        examples (as punica/S-LoRA's BGMV): one adapter's FLOPs plus N · (in + out) · r gathered params, N the
        number of ids (examples; tokens for per-token ids). Any other mix (different ranks or methods, GOAT, DoRA)
        runs every chosen adapter on the whole batch and keeps each row's own: K adapters' FLOPs, no copies.
        GOAT's aux loss and load then count each adapter over its own rows.
        Ids out of range raise when concrete; under jit they cannot, and those examples' outputs are NaN.
      Prompt/prefix tuning and bottleneck adapters are never named: they are shared by every named adapter.

    The wrapped function takes the apply function's arguments plus:
      aux_mask: optional {0,1} array over the leading (token) dims of the linear inputs, e.g. [batch, seq];
        padding tokens (0) are then left out of the aux loss. Default None counts every token (official code).
        A linear whose input has fewer leading dims that prefix the mask's (a pooler on [batch]) counts all rows.
      adapter_ids: per-example indices into `adapter` (a sequence), see above.
      mutable: as in linen; extra mutated collections are returned as a third output.

    Models that use ``nn.scan`` must list ``'jgoat_aux'`` in its ``variable_axes`` (e.g. ``{'params': 0,
    'jgoat_aux': 0}``) for GOAT's aux loss to flow out of the scan.

    With ``collect_load=True`` a third output maps each GOAT layer's module path to its expert load [*L, E]
    (fraction of top-k slots per expert over the unmasked tokens; scanned models must also list 'jgoat_load'); with
    per-example selection the keys are ``path:name``, each adapter's load over its own rows.

    Example:
      >>> out, aux = jgoat.apply(model.apply)({"params": wrapped}, x)
      >>> out, aux = jgoat.apply(model.apply, adapter=("a", "b"))({"params": multi}, x, adapter_ids=jnp.array([1, 0]))
    """
    choice = adapter_choice(adapter)

    @functools.wraps(apply_fn)
    def wrapped(variables, *args, aux_mask: jax.Array | None = None, adapter_ids: jax.Array | None = None,
                mutable=False, **kwargs):
        ids = check_selection(variables.get("params", {}), adapter, choice, adapter_ids)
        extra = mutable
        if mutable is False:
            collections = [AUX_COLLECTION]
        elif mutable is True:
            collections = True
        else:
            collections = [*([mutable] if isinstance(mutable, str) else mutable), AUX_COLLECTION]
        if collect_load and collections is not True:
            collections = [*collections, LOAD_COLLECTION]
        with nn.intercept_methods(_interceptor(aux_mask, collect_load, choice, ids)):
            out, state = apply_fn(variables, *args, mutable=collections, **kwargs)
        state = dict(state)
        aux_tree = state.pop(AUX_COLLECTION, {})
        aux = sum((jnp.sum(v) for v in jax.tree.leaves(aux_tree)), jnp.zeros((), jnp.float32))
        outputs = (out, aux)
        if collect_load:
            flat = jax.tree_util.tree_flatten_with_path(state.pop(LOAD_COLLECTION, {}))[0]
            outputs += ({"/".join(str(k.key) for k in path[:-2]) + path[-2].key[len("load"):]: v
                         for path, v in flat},)
        return outputs if extra is False else (*outputs, state)

    return wrapped


def probe(model: nn.Module, params: Mapping, *args, method: str | None = None, **kwargs) -> dict[str, Layout]:
    """Measure the exact `Layout` of every linear-like module by tracing ``model.apply`` abstractly.

    Nothing is computed or allocated (jax.eval_shape). Use it for models whose kernels are not
    [*layers, in, out], e.g. ``nn.DenseGeneral(features=(heads, head_dim))`` or attention output projections
    with ``axis=(-2, -1)``: ``jgoat.wrap(params, cfg, key=key, layouts=jgoat.probe(model, params, x))``.

    Returns:
      {module path: Layout(n_stack, n_in)} for every linear-like module called.
    """
    found: dict[str, Layout] = {}

    def record(next_fun, a, kw, context):
        module = context.module
        n_in = _linear_n_in(module) if context.method_name == "__call__" else None
        if n_in is not None and module.scope is not None and module.has_variable("params", "kernel"):
            path = tuple(module.path)
            per_call = module.get_variable("params", "kernel").ndim
            found["/".join(path)] = Layout(n_stack=get_at(params, path)["kernel"].ndim - per_call, n_in=n_in)
        return next_fun(*a, **kw)

    def run():
        with nn.intercept_methods(record):
            extra = {} if method is None else {"method": method}
            return model.apply({"params": params}, *args, **extra, **kwargs)

    jax.eval_shape(run)
    return found


def linear_n_in(module: Any) -> int | None:
    """How many trailing input dims the kernel of a linear-like module contracts (linen or NNX module); None when
    its class is not registered with `register_linear`."""
    return _linear_n_in(module)


def einsum_n_in(module: Any) -> int:
    """`register_linear`'s ``n_in`` for an einsum module (linen or NNX) with an ``einsum_str`` attribute: the number
    of contracted dims; a ValueError unless it computes [..., *in] x [*in, *out] -> [..., *out]."""
    return _einsum_n_in(module)


def adapted_output(adapter: Any, x: jax.Array, y: jax.Array, *, kernel: jax.Array, bias: jax.Array | None,
                   rng: jax.Array | None = None, token_mask: jax.Array | None = None, path: str = "",
                   collect_load: bool = False) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """One adapted linear call: the base output `y` plus `adapter`'s effect (what any injection path runs).

    Args:
      adapter: one (unstacked) adapter node; x: the input [..., *in_dims]; y: the base output [..., *out_dims].
      kernel: the layer's kernel [*in_dims, *out_dims] as the model multiplies it (dequantised for NF4); bias or None.
      rng: adapter dropout key or None; token_mask: ``aux_mask`` as given to `apply`; path: module path for errors.
      collect_load: also return GOAT's expert load.

    Returns:
      (output with the adapter, aux loss or None, expert load [E] when collect_load and GOAT, else None).
    """
    _check_stacking(adapter, path)
    x_TxI, lead = _flatten_in(x, adapter.in_features, path)
    ctx = Context(kernel_IxO=kernel.reshape(x_TxI.shape[1], -1), bias_O=None if bias is None else bias.reshape(-1),
                  rng=rng, token_mask_T=_mask_for(token_mask, lead, path))
    y_TxO, aux = adapter.forward(x_TxI, y.reshape(x_TxI.shape[0], -1), ctx)
    load = expert_load(adapter, x_TxI, ctx.token_mask_T) if collect_load and isinstance(adapter, GoatAdapter) else None
    return y_TxO.reshape(y.shape), aux, load


def adapted_output_per_example(chosen: Sequence[Any], choice: tuple[str | None, ...], ids: jax.Array, x: jax.Array,
                               y: jax.Array, *, kernel: jax.Array, bias: jax.Array | None,
                               rng: jax.Array | None = None, token_mask: jax.Array | None = None, path: str = "",
                               collect_load: bool = False) -> tuple[jax.Array, jax.Array | None, dict[str, jax.Array]]:
    """`adapted_output` with one adapter per example: what `apply`'s ``adapter_ids`` run at one module.

    Args:
      chosen: the module's adapter node for each entry of `choice` (None where it has none, or for the base).
      choice: the names given as ``adapter=(names...)``; ids: per-example (or per-token) indices into it.
      The other arguments as in `adapted_output`.

    Returns:
      (output, summed aux or None, {name: expert load [E]} for each chosen GOAT adapter when collect_load).
    """
    for adapter in chosen:
        if adapter is not None:
            _check_stacking(adapter, path)
    x_TxI, lead = _flatten_in(x, _first(chosen).in_features, path)
    ctx = Context(kernel_IxO=kernel.reshape(x_TxI.shape[1], -1), bias_O=None if bias is None else bias.reshape(-1),
                  rng=rng, token_mask_T=_mask_for(token_mask, lead, path))
    y_TxO, aux, loads = _per_example(list(chosen), choice, ids, x_TxI, y.reshape(x_TxI.shape[0], -1), lead, ctx, path)
    load = {sow[len("load:"):]: expert_load(adapter, x_TxI, mask_T) for sow, (adapter, mask_T) in loads.items()
            if collect_load and isinstance(adapter, GoatAdapter)}
    return y_TxO.reshape(y.shape), aux, load
