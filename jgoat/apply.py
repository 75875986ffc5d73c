"""Run an unmodified linen model with its adapters live: a method interceptor on linear-like modules."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jgoat._tree import ADAPTER_KEY, Layout, get_at
from jgoat.adapters import ADAPTER_TYPES, GoatAdapter
from jgoat.adapters.base import Context
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


def _interceptor(token_mask: jax.Array | None, collect_load: bool):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or _linear_n_in(module) is None or module.scope is None:
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
        if isinstance(kernel, NF4Kernel):  # QLoRA: linen can't multiply the node; dequantise this call's W here
            kernel, base = linear_base(module, kernel, _input(args, kwargs))
        else:
            base = functools.partial(next_fun, *args, **kwargs)
        if not module.has_variable("params", ADAPTER_KEY):
            return base()
        adapter = module.get_variable("params", ADAPTER_KEY)
        if not isinstance(adapter, ADAPTER_TYPES):
            return base()
        path = "/".join(module.path)
        ref_ndim = getattr(adapter, getattr(adapter, "ref_field", "A")).ndim  # ref_field: ClassVar, default "A"
        if ref_ndim != adapter.layer_ndim:
            raise ValueError(
                f"adapter at '{path}' has {ref_ndim - adapter.layer_ndim} extra leading axes but the module "
                "is not scanned over them: its kernel was read as stacked layers. Pass "
                "layouts=jgoat.probe(model, params, *inputs) to jgoat.wrap for DenseGeneral/Einsum kernels"
            )
        y = base()
        x_TxI, lead = _flatten_in(_input(args, kwargs), adapter.in_features, path)
        y_TxO = y.reshape(x_TxI.shape[0], -1)
        ctx = Context(
            kernel_IxO=kernel.reshape(adapter.in_features, -1),
            bias_O=(module.get_variable("params", "bias").reshape(-1)
                    if module.has_variable("params", "bias") else None),
            rng=module.make_rng("dropout") if adapter.dropout > 0 and module.scope.has_rng("dropout") else None,
            token_mask_T=_mask_for(token_mask, lead, path),
        )
        y_TxO, aux = adapter.forward(x_TxI, y_TxO, ctx)
        if aux is not None:
            module.sow(AUX_COLLECTION, "aux", aux)
        if collect_load and isinstance(adapter, GoatAdapter):
            module.sow(LOAD_COLLECTION, "load", expert_load(adapter, x_TxI, ctx.token_mask_T))
        return y_TxO.reshape(y.shape)

    return intercept


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


def apply(apply_fn: Callable[..., Any], *, collect_load: bool = False) -> Callable[..., tuple[Any, ...]]:
    """Wrap a linen ``apply`` so adapters in the params are live; returns ``(output, aux)``.

    ``aux`` is the GOAT auxiliary load-balancing loss summed over all GOAT layers (0.0 without GOAT).
    Adapter dropout is active when a ``'dropout'`` rng is passed (``rngs={'dropout': key}``).

    The wrapped function takes the apply function's arguments plus:
      aux_mask: optional {0,1} array over the leading (token) dims of the linear inputs, e.g. [batch, seq];
        padding tokens (0) are then left out of the aux loss. Default None counts every token (official code).
        A linear whose input has fewer leading dims that prefix the mask's (a pooler on [batch]) counts all rows.
      mutable: as in linen; extra mutated collections are returned as a third output.

    Models that use ``nn.scan`` must list ``'jgoat_aux'`` in its ``variable_axes`` (e.g. ``{'params': 0,
    'jgoat_aux': 0}``) for GOAT's aux loss to flow out of the scan.

    With ``collect_load=True`` a third output maps each GOAT layer's module path to its expert load [*L, E]
    (fraction of top-k slots per expert over the unmasked tokens; scanned models must also list 'jgoat_load').

    Example:
      >>> out, aux = jgoat.apply(model.apply)({"params": wrapped}, x)
    """

    @functools.wraps(apply_fn)
    def wrapped(variables, *args, aux_mask: jax.Array | None = None, mutable=False, **kwargs):
        extra = mutable
        if mutable is False:
            collections = [AUX_COLLECTION]
        elif mutable is True:
            collections = True
        else:
            collections = [*([mutable] if isinstance(mutable, str) else mutable), AUX_COLLECTION]
        if collect_load and collections is not True:
            collections = [*collections, LOAD_COLLECTION]
        with nn.intercept_methods(_interceptor(aux_mask, collect_load)):
            out, state = apply_fn(variables, *args, mutable=collections, **kwargs)
        state = dict(state)
        aux_tree = state.pop(AUX_COLLECTION, {})
        aux = sum((jnp.sum(v) for v in jax.tree.leaves(aux_tree)), jnp.zeros((), jnp.float32))
        outputs = (out, aux)
        if collect_load:
            flat = jax.tree_util.tree_flatten_with_path(state.pop(LOAD_COLLECTION, {}))[0]
            outputs += ({"/".join(str(k.key) for k in path[:-2]): v for path, v in flat},)
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
