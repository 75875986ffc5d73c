"""jgoat's core, imported by every other layer and importing none of them: tree paths, kernel layouts, target
selection, the adapter-config base, the trainable marker and the base fingerprint.

Walking Flax parameter trees: modules are dicts, a linear module is one holding a `kernel` array. An adapted module
holds its adapter in a slot: ``module["jgoat"]``. The slot holds one adapter node (a tree wrapped without a name), a
`TrainModule` marker (modules_to_save), or a dict {name: adapter node} of named adapters.

Layers (imports point downward only): core (this module, and :mod:`jgoat.hooks`) <- ``jgoat.adapters.<method>`` <-
``wrap``, ``quant``, ``checkpoint``, ``grad_init``, ``interop`` <- ``apply`` <- ``train`` <- ``cli``. The models
(``jgoat.models``) import the core and the hooks only; tests/test_architecture.py enforces it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import multihost_utils

from jgoat.errors import JgoatError

__version__ = "0.1.0"

ADAPTER_KEY = "jgoat"
PyTree = Any
# Module names treated as output heads: excluded from "all-linear" unless named explicitly.
HEAD_NAMES: tuple[str, ...] = ("lm_head", "classifier", "score", "head", "heads", "qa_outputs")
_SAMPLES = 1024  # elements hashed per base leaf by `fingerprint`
# Values of ``AdapterConfig.compute_dtype`` (see its docstring): "auto" is the activation dtype.
COMPUTE_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


@struct.dataclass
class TrainModule:
    """Marker placed beside the params of a `modules_to_save` module: all of that module's params are trainable."""


def _field_error(field: dataclasses.Field, value: Any) -> str | None:
    """What `value` should be to fit `field` by its declared type, or None if it fits."""
    declared = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    declared = declared.replace(" ", "")
    if "|None" in declared and value is None:
        return None
    kind = declared.replace("|None", "")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            return "a positive integer"
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return "a finite number"
    elif kind == "bool":
        if not isinstance(value, bool):
            return "True or False"
    elif kind == "str" and not isinstance(value, str):
        return "a string"
    return None


def check_fields(obj: Any) -> None:
    """Validate every field of a config dataclass against its declared type (one ValueError naming the field).

    ``int`` fields are counts (ranks, experts, top_k, tokens): positive integers, bool refused (it is an int in
    Python); ``float`` fields are finite real numbers (NaN/inf and strings refused); ``bool`` fields are bools;
    ``str`` fields are strings; ``X | None`` also accepts None. Ranges beyond that are each method's own checks.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        wanted = _field_error(f, value)
        if wanted is not None:
            raise JgoatError(f"{type(obj).__name__}.{f.name} must be {wanted}, got {value!r}")
        if isinstance(value, numbers.Number) and type(value) not in (bool, int, float):  # numpy scalars -> Python
            object.__setattr__(obj, f.name, int(value) if isinstance(value, numbers.Integral) else float(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Targeting knobs shared by every method.

    Attributes:
      targets: which linear modules get an adapter. A string is a regular expression that must match a whole
        '/'-joined module path (e.g. ``r".*/(query|value)"``); a list/tuple of names matches modules whose last
        path component (or '/'-joined path suffix) equals one of them (HF PEFT's ``target_modules`` semantics);
        ``"all-linear"`` selects every linear kernel except output heads (see ``HEAD_NAMES``) and convolutions.
      exclude: same forms as ``targets`` (without "all-linear"); removes modules from the selection.
      modules_to_save: modules (same forms) whose own parameters become fully trainable, e.g. a new classifier.
      dropout: adapter dropout on the adapter input only (active when a 'dropout' rng is passed to apply).
      compute_dtype: the dtype policy of the adapter maths (one of :data:`COMPUTE_DTYPES`; a dtype such as
        ``jnp.bfloat16`` is accepted and stored by name). Every matmul of the adapter on activations (x·A, h·B, the
        residual offsets, GOAT's experts and router, DoRA's / (IA)³'s product with the frozen kernel) takes its
        operands in this dtype and accumulates in float32 (``preferred_element_type=float32``), in the forward and
        the backward pass (:func:`einsum`: the cotangent is rounded once to this dtype, as mixed-precision autocast
        does); the float32 results combine with the adapter's small float32 factors (scalings, gates, DoRA's gain)
        in float32 and the update is cast to the layer's output dtype once. ``"auto"`` (the default) is the dtype
        of the layer's input activations: a bf16 model moves bf16 activations through its adapters (no float32
        copy of x per targeted layer, none kept for the backward pass), which is what a bf16 user expects, while a
        float32 model computes exactly as before, bit for bit (float32 operands with float32 accumulation are the
        same dot products, autodiff unchanged), so the default is no silent change for float32 models.
        ``"float32"`` reproduces jgoat's earlier behaviour for every model (activations upcast to float32).
        Always float32 whatever the policy: the parameters and the optimizer state (the policy only casts copies
        inside the forward; their gradients come back float32), GOAT's router logits (float32-accurate: see
        ``jgoat.adapters.goat``), softmax, top-k and aux loss, weight-sized maths (merges, DoRA's column norms) and
        element-wise scalings such as (IA)³'s vector (fused by XLA, so float32 costs no extra memory traffic there,
        while a bf16 l ≈ 1 would round away updates below 2^-8).

    The policy lives in the config only (one source of truth): ``init`` copies it onto each adapter node as a static
    field, as it does ``scale`` and ``dropout``; :func:`resolve_compute_dtype` turns it into a dtype. A per-config
    field rather than a global setting keeps every function pure and lets adapters of different precision share a
    tree (named adapters). Bottleneck adapters (whose params are plain arrays read by the models' hook points) follow
    "auto".
    """

    targets: str | Sequence[str] = "all-linear"
    exclude: str | Sequence[str] = ()
    modules_to_save: str | Sequence[str] = ()
    dropout: float = 0.0
    compute_dtype: str = "auto"

    method: ClassVar[str] = "base"

    def __post_init__(self):
        object.__setattr__(self, "compute_dtype", check_compute_dtype(self.compute_dtype, type(self).__name__))
        check_fields(self)
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, list):  # keep configs hashable
                object.__setattr__(self, name, tuple(value))
            value = getattr(self, name)
            check_rule_form(value, name)
        if self.targets == "" or self.targets == ():
            raise ValueError("targets is empty: give a regex, a list of module names, or 'all-linear'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def check_layer(self, path: str, in_features: int, out_features: int) -> None:
        """Raise a ValueError if this config cannot adapt a layer of this shape."""

    @property
    def reads_base(self) -> bool:
        """Whether the init decomposes the base kernel (SVD, QR, norms): `wrap` then refuses a non-finite base."""
        return False


def check_compute_dtype(value: Any, owner: str) -> str:
    """The name (one of :data:`COMPUTE_DTYPES`) of a compute-dtype policy given as a name or a dtype; a ValueError
    naming ``<owner>.compute_dtype`` otherwise."""
    name = value
    if not isinstance(value, str):
        try:
            name = jnp.dtype(value).name
        except (TypeError, ValueError):
            name = None
    if name not in COMPUTE_DTYPES:
        raise JgoatError(f"{owner}.compute_dtype must be one of {', '.join(repr(d) for d in COMPUTE_DTYPES)} "
                         f"(or the matching dtype), got {value!r}")
    return name


def resolve_compute_dtype(policy: str, activation_dtype: Any) -> np.dtype:
    """The dtype adapter matmul operands take under `policy` for activations of `activation_dtype`."""
    return jnp.dtype(activation_dtype) if policy == "auto" else jnp.dtype(policy)


def einsum(spec: str, x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """``einsum(spec, x, w)`` of activations x and a weight w under a compute dtype: a float32 result.

    float32: ``jnp.einsum`` of float32 operands, differentiated by JAX as any einsum. A lower precision: both
    operands cast to `dtype`, float32 accumulation (``preferred_element_type``), and a custom VJP that keeps the
    backward pass in `dtype` as well (the float32 cotangent is rounded to `dtype` once, as mixed-precision autocast
    does; both backward contractions take `dtype` operands and accumulate in float32; x's gradient comes back in x's
    dtype, w's in w's — float32 for float32 params). Without it, JAX's transpose would multiply the float32
    cotangent with the `dtype` operands, and XLA would form a float32 copy of x for the weight gradient.
    `spec` names each index once per operand (``"ti,io->to"``, ``"tei,eid->ted"``).
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return _einsum_low(spec, dtype, x, w)


def _dot_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(spec, a, b)`` of low-precision operands with float32 accumulation.

    XLA:CPU's runtime has no bf16 x bf16 -> f32 dot with batch dimensions (it raises UNIMPLEMENTED at run time, e.g.
    GOAT's per-expert ``tei,eid->ted``), so on CPU such a contraction widens its already-rounded operands to float32
    first: the same products (a product of two bf16 / fp16 numbers is exact in float32) summed in float32, i.e. the
    same result up to summation order. Accelerators get the low-precision dot.
    """
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    batched = any(i in rhs and i in out for i in lhs)
    if batched and jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum_low(spec: str, dtype: np.dtype, x: jax.Array, w: jax.Array) -> jax.Array:
    return _dot_f32(spec, x.astype(dtype), w.astype(dtype))


def _einsum_low_fwd(spec, dtype, x, w):
    x_c, w_c = x.astype(dtype), w.astype(dtype)
    out = _dot_f32(spec, x_c, w_c)
    return out, (x_c, w_c, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))  # the zeros carry the primal dtypes


def _einsum_low_bwd(spec, dtype, res, ct):
    x_c, w_c, x_like, w_like = res
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    ct_c = ct.astype(dtype)
    dx = _dot_f32(f"{out},{rhs}->{lhs}", ct_c, w_c)
    dw = _dot_f32(f"{lhs},{out}->{rhs}", x_c, ct_c)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_einsum_low.defvjp(_einsum_low_fwd, _einsum_low_bwd)


def matmul(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x [..., in] @ w [in, out] under a compute dtype (:func:`einsum`): a float32 result. With dtype float32 it is
    exactly the float32 product ``x.astype(float32) @ w``."""
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), preferred_element_type=jnp.float32)
    out = einsum("ti,io->to", x.reshape(-1, x.shape[-1]), w, dtype)
    return out.reshape(*x.shape[:-1], w.shape[-1])


def check_rule_form(rule: Any, what: str) -> None:
    """A targeting rule is a valid regex string or a sequence of module-name strings (a ValueError names `what`)."""
    if isinstance(rule, str):
        try:
            re.compile(rule)
        except re.error as e:
            raise JgoatError(f"{what}={rule!r} is not a valid regular expression: {e}") from None
    elif isinstance(rule, (bytes, Mapping)) or not isinstance(rule, Sequence) \
            or not all(isinstance(v, str) for v in rule):
        raise JgoatError(f"{what} must be a regex string or a sequence of module names, got {rule!r}")


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


def to_dict(tree: PyTree) -> PyTree:
    """A copy of `tree` with every Mapping (FrozenDict included) turned into a plain dict; leaves shared."""
    if isinstance(tree, Mapping):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


# --------------------------------------------------------------------------------------------------- layouts, targets


def layout_for(path: Sequence[str], kernel: Any, layouts: Mapping[str, Layout] | None = None) -> Layout:
    """The `Layout` of the kernel at `path`: the kernel's own (a quantised ``jgoat.quant.NF4Kernel`` carries the one
    fixed at quantisation), else ``layouts[path]`` (``jgoat.probe``), else the default for its ndim."""
    own = getattr(kernel, "layout", None)
    if isinstance(own, Layout):
        return own
    if layouts is not None and path_str(path) in layouts:
        return layouts[path_str(path)]
    return Layout(n_stack=max(kernel.ndim - 2, 0), n_in=1)


def check_rule(rule: str | Sequence[str], paths: Sequence[tuple[str, ...]], what: str) -> None:
    """Every regex / every listed name of a rule must match at least one of `paths` (a ValueError names some)."""
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
        check_rule(cfg.targets, linears, "targets")
        chosen = [p for p in linears if rule_matches(cfg.targets, p)]
    if cfg.exclude:
        check_rule(cfg.exclude, linears, "exclude")
        chosen = [p for p in chosen if not rule_matches(cfg.exclude, p)]
    if not chosen:
        raise ValueError(f"targets={cfg.targets!r} minus exclude={cfg.exclude!r} selects no module")
    return chosen


def module_key(key: jax.Array, path: Sequence[str]) -> jax.Array:
    """The PRNG key of the module at `path`, independent of tree order: a CRC of the path folded into `key`."""
    return jax.random.fold_in(key, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)


# --------------------------------------------------------------------------------------------------- adapter leaves


def leaf_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """('/'-path, leaf) of every leaf of `tree`, in flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in leaves]


def saved_prefixes(tree: PyTree, prefix: str = "") -> list[str]:
    """'/'-paths of the modules marked as modules_to_save (a `TrainModule` in their slot)."""
    out = []
    if isinstance(tree, Mapping):
        if isinstance(tree.get(ADAPTER_KEY), TrainModule):
            out.append(prefix.rstrip("/"))
        for name, child in tree.items():
            out += saved_prefixes(child, f"{prefix}{name}/")
    return out


def is_adapter_path(path: str, saved: Sequence[str]) -> bool:
    """Whether the leaf at '/'-path `path` is adapter state: inside a ``jgoat`` slot or a modules_to_save module
    (`saved`, from `saved_prefixes`)."""
    return ADAPTER_KEY in path.split("/") or any(path.startswith(p + "/") for p in saved)


def adapter_leaves(tree: PyTree) -> dict[str, Any]:
    """{path: array} of everything a checkpoint stores: adapter arrays and modules_to_save params."""
    saved = saved_prefixes(tree)
    return {p: x for p, x in leaf_paths(tree) if is_adapter_path(p, saved)}


def fingerprint(tree: PyTree) -> str:
    """A stable id of the frozen base weights (adapters and modules_to_save excluded).

    sha256 over every base leaf's path, shape, dtype and the exact bytes of up to 1024 evenly spaced elements plus
    the first and last 64: any re-trained, re-quantised or different checkpoint changes it, while hashing stays
    cheap for 7B-parameter trees and independent of the platform (no floating-point reductions).
    """
    saved = saved_prefixes(tree)
    h = hashlib.sha256()
    for path, leaf in leaf_paths(tree):
        if is_adapter_path(path, saved):
            continue
        n = math.prod(leaf.shape)
        idx = np.unique(np.concatenate([np.linspace(0, n - 1, min(n, _SAMPLES)).astype(np.int64),
                                        np.arange(min(n, 64)), np.arange(max(n - 64, 0), n)]))
        # the flat (C-order) positions as per-dim indices: a sharded leaf is sampled in place, never reshaped to 1-D
        # (which would gather it onto every device)
        sample = leaf[np.unravel_index(idx, leaf.shape)] if leaf.ndim else leaf
        if isinstance(sample, jax.Array) and not sample.is_fully_addressable:  # spread over several processes:
            sample = multihost_utils.process_allgather(sample, tiled=True)  # every process gathers the samples
        sample = np.asarray(sample).reshape(-1)
        h.update(f"{path}|{tuple(leaf.shape)}|{sample.dtype}|".encode())
        h.update(sample.tobytes())
    return h.hexdigest()
