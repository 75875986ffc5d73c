"""Training on a device mesh: a `Mesh` with data / fsdp / tensor / expert axes, partition rules as data, adapters
that inherit their base layer's sharding, the sharded train step, sharded checkpoints.

JAX's own SPMD does the distributed work: params, adapters and optimizer state are `jax.Array`s with a
`NamedSharding`, the train step is one ``jit`` with explicit in/out shardings, and XLA (GSPMD) inserts the
collectives. A jitted step over sharded arrays computes the same global function as on one device, so batch means
(the task loss, GOAT's aux loss and expert loads) are over the whole global batch, not per shard.

Partition rules are two tables of plain data, both overridable:
  * param rules: (regex fully matching a param's '/'-path, logical axes of its trailing dims). Leading dims the rule
    does not name (the layer axis of ``nn.scan``-stacked params) get the logical axis "layers". First match wins;
    user rules are tried before :data:`PARAM_RULES`.
  * logical rules: logical axis -> mesh axis (or tuple of mesh axes, or None), :data:`LOGICAL_RULES` updated by
    the user's mapping.
The defaults are MaxText-style: FSDP shards the hidden ("embed") dim of every large kernel and embedding; tensor
parallelism is Megatron-style (q/k/v/gate/up split on their output dim, o/down on their input dim, embeddings and
the LM head on the vocabulary). A param no rule matches (a user's own model) gets FSDP on its largest dim that the
fsdp size divides when it has ≥ 2 dims, else is replicated.

Fallback: a dim that the product of its mesh axes does not divide is replicated (e.g. 2 KV heads on tensor=4, a
classifier with 3 labels); a mesh axis is used at most once per array (a later dim asking for it is replicated).

Adapters need no rules: each field's dims are typed (in, out, rank, expert) in :data:`ADAPTER_DIMS`, and "in" /
"out" take the mesh axes of the adapted kernel's input / output dims (LoRA A [in, r] follows the kernel's input
sharding, B [r, out] its output sharding, the rank dim is replicated; GOAT's experts use the logical axis
"expert"). An adapter leaf that inherits no fsdp axis (A of o_proj / down_proj, whose kernel has fsdp on its output
dim) gets it on its largest in/out dim where it divides, so fsdp=N divides adapters and their optimizer state too.
NF4 kernels shard their flat codes and block absmax over the kernel's mesh axes together.

``jgoat.fingerprint`` (used by save/restore) samples each base leaf with per-dim indices, so a sharded leaf is read
where it lies (no all-gather). ``jgoat.fit(..., mesh=...)`` and ``jgoat train --mesh`` train with these helpers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jgoat.adapters import (
    DoraAdapter,
    GoatAdapter,
    GoraAdapter,
    IA3Adapter,
    KasaAdapter,
    LoraAdapter,
    LoriAdapter,
)
from jgoat.core import ADAPTER_KEY, Layout, layout_for, path_str
from jgoat.quant import NF4Kernel
from jgoat.train import TrainState

PyTree = Any
MeshAxes = str | tuple[str, ...] | None

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes. "embed": the hidden dim (FSDP); "heads"/"kv_heads"/"mlp"/"vocab": Megatron tensor
# parallelism; "expert": GOAT experts and MoE experts; "layers": the leading axis of scanned (stacked) layers.
LOGICAL_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "expert": "expert",
    "layers": None,
}

_ATTN_IN = r"(q_proj|k_proj|v_proj|query|key|value)"
# (regex over the full '/'-path of a param, logical axes of its trailing dims), first match wins. Covers every model
# in jgoat.models: Llama / Mistral / Qwen2 (scanned or unrolled, MoE), BERT / RoBERTa, CLIP vision, ViT, and
# jgoat's own prompt / prefix / bottleneck params.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # decoders (jgoat.models.llama)
    (r"(.*/)?embed_tokens/embedding", ("vocab", "embed")),
    (r"(.*/)?lm_head/kernel", ("embed", "vocab")),
    (r".*self_attn/q_proj/kernel", ("embed", "heads")),
    (r".*self_attn/(k_proj|v_proj)/kernel", ("embed", "kv_heads")),
    (r".*self_attn/q_proj/bias", ("heads",)),
    (r".*self_attn/(k_proj|v_proj)/bias", ("kv_heads",)),
    (r".*self_attn/(o_proj|out_proj)/kernel", ("heads", "embed")),
    (r".*mlp/(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r".*mlp/down_proj/kernel", ("mlp", "embed")),
    (r".*mlp/(gate_proj|up_proj)/bias", ("mlp",)),
    (r".*mlp/(gate_proj|up_proj)", ("expert", "embed", "mlp")),  # MoE experts [L, E, D, F]
    (r".*mlp/down_proj", ("expert", "mlp", "embed")),
    (r".*mlp/router", ("embed", None)),
    # CLIP vision (self_attn q/k/v/out_proj above) and its MLP
    (r".*mlp/fc1/kernel", ("embed", "mlp")),
    (r".*mlp/fc1/bias", ("mlp",)),
    (r".*mlp/fc2/kernel", ("mlp", "embed")),
    (r".*(patch_embedding|patch_embeddings/projection)/kernel", (None, None, None, "embed")),
    (r".*position_embedding/embedding", (None, "embed")),
    # BERT / RoBERTa / ViT
    (r".*word_embeddings/embedding", ("vocab", "embed")),
    (r".*(position_embeddings|token_type_embeddings)/embedding", (None, "embed")),
    (rf".*attention/(self|attention)/{_ATTN_IN}/kernel", ("embed", "heads")),
    (rf".*attention/(self|attention)/{_ATTN_IN}/bias", ("heads",)),
    (r".*attention/output/dense/kernel", ("heads", "embed")),
    (r".*intermediate/dense/kernel", ("embed", "mlp")),
    (r".*intermediate/dense/bias", ("mlp",)),
    (r".*output/dense/kernel", ("mlp", "embed")),
    (r"(.*/)?(pooler/dense|classifier/dense)/kernel", ("embed", None)),
    (r"(.*/)?(classifier|classifier/out_proj)/kernel", ("embed", None)),
    # jgoat's graph-changing adapters: prompt table on the embedding dim, prefix replicated (small), bottleneck
    (r".*jgoat_prompt/embedding", (None, "embed")),
    (r".*jgoat_prefix/.*", ()),
    (r".*jgoat_bottleneck/.*/down_kernel", ("embed", None)),
    (r".*jgoat_bottleneck/.*/up_kernel", (None, "embed")),
    # small leaves: norms, remaining biases, class tokens
    (r".*/(scale|bias|class_embedding|cls_token|position_embeddings)", ()),
)

# Each adapter field's dims for ONE layer (stacked adapters add the kernel's leading stack dims): "in"/"out" take
# the adapted kernel's input/output mesh axes, "expert" the logical axis "expert", "rank" (and scalars) replicated.
_LORA_DIMS = {"A": ("in", "rank"), "B": ("rank", "out"), "res_A": ("in", "rank"), "res_B": ("rank", "out")}
ADAPTER_DIMS: dict[type, dict[str, tuple[str, ...]]] = {
    LoraAdapter: _LORA_DIMS,
    DoraAdapter: {"A": ("in", "rank"), "B": ("rank", "out"), "m": ("out",)},
    GoatAdapter: {"A": ("expert", "in", "rank"), "B": ("expert", "rank", "out"), "router": ("in", "expert"),
                  "res_A": ("in", "rank"), "res_B": ("rank", "out")},
    IA3Adapter: {"l": ("out",)},  # ("in",) for a feed-forward IA³ vector, see _adapter_dims
    KasaAdapter: {**_LORA_DIMS, "diag": ("rank",)},
    LoriAdapter: {"A": ("in", "rank"), "B": ("rank", "out"), "mask": ("rank", "out")},
    GoraAdapter: {"A": ("in", "rank"), "B": ("rank", "out"), "rank": (), "scale": ()},
}


def mesh(*, data: int | None = None, fsdp: int = 1, tensor: int = 1, expert: int = 1,
         devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor", "expert") over `devices` (default: every global device).

    `data` defaults to whatever the other axes leave (all devices on "data" when nothing is given). Sizes that do not
    multiply to the device count are a ValueError, raised before anything is allocated.

    Example:
      >>> m = jgoat.mesh(fsdp=4)                 # 8 devices: data=2, fsdp=4
      >>> m = jgoat.mesh(data=1, fsdp=4, tensor=2)
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("fsdp", fsdp), ("tensor", tensor), ("expert", expert), ("data", data)):
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"mesh axis {name} must be a positive integer, got {size!r}")
    rest = fsdp * tensor * expert
    if data is None:
        if n % rest:
            raise ValueError(f"fsdp×tensor×expert = {fsdp}×{tensor}×{expert} = {rest} does not divide the {n} devices")
        data = n // rest
    if data * rest != n:
        raise ValueError(f"mesh data×fsdp×tensor×expert = {data}×{fsdp}×{tensor}×{expert} = {data * rest} != "
                         f"{n} devices")
    return jax.make_mesh((data, fsdp, tensor, expert), MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _resolve(shape: Sequence[int], dims: Sequence[tuple[str, ...]], mesh_: Mesh) -> PartitionSpec:
    """PartitionSpec for `shape` from wanted mesh axes per dim: axes of size 1 or absent from the mesh dropped, an axis
    already used by an earlier dim dropped, a dim its axes' product does not divide replicated."""
    used: set[str] = set()
    spec = []
    for size, axes in zip(shape, dims, strict=True):
        axes = tuple(a for a in axes if mesh_.shape.get(a, 1) > 1 and a not in used)
        if not axes or size % math.prod(mesh_.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _spec_axes(spec: PartitionSpec, ndim: int) -> list[tuple[str, ...]]:
    return [_as_tuple(spec[i]) if i < len(spec) else () for i in range(ndim)]


@dataclasses.dataclass(frozen=True)
class _Rules:
    params: tuple[tuple[re.Pattern, tuple[str | None, ...]], ...]
    logical: Mapping[str, MeshAxes]
    mesh: Mesh

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        return () if logical is None else _as_tuple(self.logical.get(logical))

    def leaf_dims(self, path: str, shape: Sequence[int], n_stack: int) -> list[tuple[str, ...]]:
        """Wanted mesh axes per dim of the param at `path` (rules, else the FSDP-on-largest-dim fallback)."""
        for pattern, axes in self.params:
            if pattern.fullmatch(path):
                axes = tuple(axes)[-len(shape):] if len(shape) else ()
                lead = ("layers",) * (len(shape) - len(axes))
                return [self.mesh_axes(a) for a in (*lead, *axes)]
        dims: list[tuple[str, ...]] = [()] * len(shape)
        if len(shape) - n_stack >= 2:
            fsdp = self.mesh_axes("embed")
            n = math.prod(self.mesh.shape.get(a, 1) for a in fsdp)
            sizes = [(s if s % n == 0 else 0, -i) for i, s in enumerate(shape) if i >= n_stack]
            best = max(sizes)
            if best[0]:
                dims[-best[1]] = fsdp
        return dims

    def spec(self, path: str, shape: Sequence[int], n_stack: int = 0) -> PartitionSpec:
        return _resolve(shape, self.leaf_dims(path, shape, n_stack), self.mesh)


def _adapter_dims(adapter) -> dict[str, tuple[str, ...]]:
    dims = ADAPTER_DIMS.get(type(adapter))
    if dims is None:
        raise TypeError(f"no sharding dims for adapter type {type(adapter).__name__}; add it to "
                        "jgoat.sharding.ADAPTER_DIMS")
    if isinstance(adapter, IA3Adapter) and adapter.feedforward:
        return {"l": ("in",)}
    return dims


def _kernel_parts(kernel, layout: Layout, rules: _Rules, path: str):
    """(PartitionSpec of the kernel or None, wanted mesh axes of its stack dims, of its input dims, of its output
    dims) — for an NF4 kernel, of the logical (dequantised) kernel shape."""
    shape = tuple(kernel.shape)
    spec = rules.spec(path, shape, layout.n_stack)
    axes = _spec_axes(spec, len(shape))
    n_stack, n_in = layout.n_stack, layout.n_in
    stack = axes[:n_stack]
    in_axes = tuple(a for dim in axes[n_stack:n_stack + n_in] for a in dim)
    out_axes = tuple(a for dim in axes[n_stack + n_in:] for a in dim)
    return spec, stack, in_axes, out_axes


def _nf4_shardings(kernel: NF4Kernel, stack, in_axes, out_axes, mesh_: Mesh) -> NF4Kernel:
    """Codes [*stack, n/2] and absmax [*stack, blocks]: the flat dim over the kernel's mesh axes (output dims first,
    as the codes are flattened in torch layout [out, in]) when both lengths are divisible, else fewer axes, else
    replicated; the double-quantisation statistics replicated."""
    flat = (kernel.codes.shape[-1], kernel.absmax.shape[-1])
    chosen: tuple[str, ...] = ()
    for axes in (out_axes + in_axes, out_axes, in_axes):
        axes = tuple(a for a in axes if mesh_.shape.get(a, 1) > 1)
        n = math.prod(mesh_.shape[a] for a in axes)
        if axes and all(length % n == 0 for length in flat):
            chosen = axes
            break

    def place(x, last):
        if x is None:
            return None
        dims = [*stack, last][-x.ndim:] if x.ndim else []
        return NamedSharding(mesh_, _resolve(x.shape, [*([()] * (x.ndim - len(dims))), *dims], mesh_))

    return kernel.replace(codes=place(kernel.codes, chosen), absmax=place(kernel.absmax, chosen),
                          absmax2=place(kernel.absmax2, ()), offset=place(kernel.offset, ()))


def _adapter_shardings(adapter, stack, in_axes, out_axes, rules: _Rules):
    """The adapter node with a NamedSharding per array field (None fields stay None)."""
    roles = {"in": in_axes, "out": out_axes, "rank": (), "expert": rules.mesh_axes("expert")}
    out = {}
    for name, dims in _adapter_dims(adapter).items():
        x = getattr(adapter, name)
        if x is None:
            continue
        lead = x.ndim - len(dims)
        wanted = [*(stack[:lead] if lead <= len(stack) else [*stack, *([()] * (lead - len(stack)))]),
                  *(roles[d] for d in dims)]
        spec = _resolve(x.shape, wanted, rules.mesh)
        out[name] = NamedSharding(rules.mesh, _complete_fsdp(spec, x.shape, [None] * lead + list(dims), rules))
    return adapter.replace(**out)


def _complete_fsdp(spec: PartitionSpec, shape, roles: Sequence[str | None], rules: _Rules) -> PartitionSpec:
    """FSDP for every adapter leaf: one that inherited no FSDP axis (A of o_proj / down_proj, whose kernel has FSDP on
    its output dim) adds it to its largest in/out dim where the combined axes divide; else `spec` unchanged."""
    fsdp = tuple(a for a in rules.mesh_axes("embed") if rules.mesh.shape.get(a, 1) > 1)
    axes = _spec_axes(spec, len(shape))
    if not fsdp or any(a in dim for dim in axes for a in fsdp):
        return spec
    for size, i in sorted(((shape[i], -i) for i, r in enumerate(roles) if r in ("in", "out")), reverse=True):
        combined = axes[-i] + fsdp
        if size % math.prod(rules.mesh.shape[a] for a in combined) == 0:
            axes[-i] = combined
            return PartitionSpec(*(None if not a else a[0] if len(a) == 1 else a for a in axes))
    return spec


def _walk(module: Mapping, prefix: tuple[str, ...], rules: _Rules, layouts: Mapping[str, Layout] | None):
    out = {}
    kernel = module.get("kernel")
    for name, value in module.items():
        path = (*prefix, str(name))
        if name == ADAPTER_KEY:
            out[name] = _slot(value, module, prefix, rules, layouts)
        elif isinstance(value, Mapping):
            out[name] = _walk(value, path, rules, layouts)
        elif isinstance(value, NF4Kernel):
            _, stack, in_axes, out_axes = _kernel_parts(value, value.layout, rules, path_str(path))
            out[name] = _nf4_shardings(value, stack, in_axes, out_axes, rules.mesh)
        elif value is None or not hasattr(value, "shape"):
            out[name] = value
        else:
            n_stack = layout_for(prefix, kernel, layouts).n_stack if name == "kernel" else 0
            out[name] = NamedSharding(rules.mesh, rules.spec(path_str(path), value.shape, n_stack))
    return out


def _slot(slot, module: Mapping, prefix: tuple[str, ...], rules: _Rules, layouts):
    adapters = slot if isinstance(slot, Mapping) else {None: slot}
    if not any(type(a) in ADAPTER_DIMS for a in adapters.values()):
        return slot  # TrainModule marker (no arrays)
    kernel = module.get("kernel")
    if kernel is None:
        raise ValueError(f"the adapter at '{path_str(prefix)}' has no kernel beside it: pass the full wrapped tree "
                         "to jgoat.shardings and split the result (jgoat.split(shardings)) for the trainable half")
    _, stack, in_axes, out_axes = _kernel_parts(kernel, layout_for(prefix, kernel, layouts), rules,
                                                path_str((*prefix, "kernel")))
    placed = {n: _adapter_shardings(a, stack, in_axes, out_axes, rules) for n, a in adapters.items()}
    return placed[None] if None in placed else placed


def shardings(tree: PyTree, mesh: Mesh, *, rules: Sequence[tuple[str, Sequence[str | None]]] = (),
              logical: Mapping[str, MeshAxes] | None = None,
              layouts: Mapping[str, Layout] | None = None) -> PyTree:
    """A tree of `NamedSharding`s with `tree`'s structure (arrays, or ``jax.ShapeDtypeStruct`` from eval_shape).

    Args:
      tree: a params tree, wrapped or not (adapters, NF4 kernels, prompt/prefix/bottleneck params); must hold the
        kernels the adapters sit beside (for the trainable / frozen halves, split the result: ``jgoat.split(sh)``).
      mesh: from :func:`mesh` (or any Mesh; rules naming absent axes leave those dims replicated).
      rules: extra (regex over the param '/'-path, logical axes of its trailing dims) tried before
        :data:`PARAM_RULES`, e.g. ``[(r".*/my_proj/kernel", ("embed", "mlp"))]``.
      logical: updates to :data:`LOGICAL_RULES`, e.g. ``{"mlp": None}`` (no tensor split of the MLP).
      layouts: per-module `Layout` as given to ``jgoat.wrap`` (DenseGeneral / Einsum kernels).

    Returns:
      The sharding tree; adapters inherit their kernel's input / output sharding (see :data:`ADAPTER_DIMS`).

    Example:
      >>> sh = jgoat.shardings(wrapped, jgoat.mesh(fsdp=8))
      >>> trainable_sh, frozen_sh = jgoat.split(sh)
    """
    compiled = tuple((re.compile(r), tuple(a)) for r, a in (*rules, *PARAM_RULES))
    resolved = _Rules(compiled, {**LOGICAL_RULES, **(logical or {})}, mesh)
    if not isinstance(tree, Mapping):
        raise TypeError(f"jgoat.shardings takes a params tree (nested dicts), got {type(tree).__name__}")
    return _walk(tree, (), resolved, layouts)


def shard(tree: PyTree, mesh: Mesh, **kwargs) -> PyTree:
    """`tree` placed on `mesh` with :func:`shardings` (same keyword arguments)."""
    return jax.device_put(tree, shardings(tree, mesh, **kwargs))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(tx: optax.GradientTransformation, trainable: PyTree, trainable_shardings: PyTree,
                    mesh: Mesh) -> TrainState:
    """Shardings of ``TrainState.create(trainable, tx)``: the optimizer state follows the params.

    Every params-shaped subtree of ``tx.init(trainable)`` (Adam's mu and nu, ...) takes `trainable_shardings`
    (``optax.tree_utils.tree_map_params``, evaluated abstractly); the rest (counts, schedules) is replicated.
    """
    abstract = jax.eval_shape(tx.init, trainable)
    repl = replicated(mesh)
    opt = optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract, trainable_shardings,
                                           transform_non_params=lambda _: repl,
                                           is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=repl, trainable=trainable_shardings, opt_state=opt)


def create_state(trainable: PyTree, tx: optax.GradientTransformation, state_sh: TrainState) -> TrainState:
    """``TrainState.create(trainable, tx)`` computed on the mesh (jit with `state_sh` as output shardings): the
    optimizer state is born sharded, and the state owns fresh buffers, so donating it to the step never deletes
    `trainable`'s arrays."""
    return jax.jit(functools.partial(TrainState.create, tx=tx), out_shardings=state_sh)(trainable)


def batch_sharding(mesh: Mesh, *, batch_axes: Sequence[str] = ("data", "fsdp"), leading: int = 0) -> NamedSharding:
    """Batch leaves split over `batch_axes` on their dim `leading` (1 for micro-batches [A, B, ...])."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), tuple(batch_axes)))


def process_rows(mesh: Mesh, rows: int, *, batch_axes: Sequence[str] = ("data", "fsdp")) -> np.ndarray:
    """The rows of a global batch of `rows` that this process's devices hold on `mesh` (every row in one process):
    what this process reads and hands to :func:`place_batch`. A `rows` the batch axes do not divide is a
    ValueError."""
    size = math.prod(mesh.shape[a] for a in batch_axes)
    if rows % size:
        raise ValueError(f"a global batch of {rows} rows is not divisible by the {'×'.join(batch_axes)} = {size} "
                         "devices it is split over")
    spans = batch_sharding(mesh, batch_axes=batch_axes).addressable_devices_indices_map((rows,)).values()
    return np.unique(np.concatenate([np.arange(rows)[s[0]] for s in spans]))


def place_batch(batch: PyTree, mesh: Mesh, *, batch_axes: Sequence[str] = ("data", "fsdp")) -> PyTree:
    """A host batch as global `jax.Array`s split over `batch_axes` (dim 0). In one process `batch` is the whole
    global batch; with several processes (``jax.distributed``) it is this process's rows, those of
    :func:`process_rows` in order, and the global batch is every process's rows together."""
    sh = batch_sharding(mesh, batch_axes=batch_axes)
    if jax.process_count() == 1:
        return jax.device_put(batch, sh)

    # the global shape inferred from the sharding: processes whose devices hold the same rows (an axis other than
    # `batch_axes` spanning processes) each give those rows, not a share of their own
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)), batch)


def sharded_step(step_fn: Callable, mesh: Mesh, state_sh: TrainState, frozen_sh: PyTree, *,
                 batch_axes: Sequence[str] = ("data", "fsdp"), micro_batches: bool = False,
                 donate: bool = True) -> Callable:
    """`step_fn(state, frozen, batch, rng) -> (state, metrics)` jitted on `mesh` with explicit shardings.

    The state takes `state_sh` in and out (donated unless ``donate=False``), the frozen base `frozen_sh`, every batch
    leaf is split over `batch_axes` on its batch dim (dim 1 with ``micro_batches=True``, for
    ``jgoat.accumulate_step``), the rng and the metrics are replicated. A batch dim not divisible by the product of
    the batch axes is a ValueError before anything runs.

    Example:
      >>> step = jgoat.sharded_step(functools.partial(jgoat.train_step, loss_fn=loss_fn, tx=tx), m, state_sh, fsh)
      >>> state, metrics = step(state, frozen, batch, rng)
    """
    leading = 1 if micro_batches else 0
    data = batch_sharding(mesh, batch_axes=batch_axes, leading=leading)
    repl = replicated(mesh)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, data, repl), out_shardings=(state_sh, repl),
                     donate_argnums=(0,) if donate else ())
    size = math.prod(mesh.shape[a] for a in batch_axes)

    @functools.wraps(step_fn)
    def run(state, frozen, batch, rng):
        for x in jax.tree.leaves(batch):
            if np.ndim(x) <= leading or np.shape(x)[leading] % size:
                raise ValueError(f"batch dim {leading} of a batch leaf with shape {np.shape(x)} is not divisible by "
                                 f"the {'×'.join(batch_axes)} = {size} devices it is split over")
        return jitted(state, frozen, batch, rng)

    run.lower = jitted.lower
    return run


def compiled_memory(step: Callable, *args) -> dict[str, int]:
    """XLA's per-device memory plan of `step` (from :func:`sharded_step`) for these arguments, without running it.

    `args` may be abstract (``jax.ShapeDtypeStruct`` from ``jax.eval_shape``): a Llama-2-7B-shaped step compiles
    on a CPU host with nothing allocated. Bytes per device: arguments, outputs, aliased (donated) bytes,
    temporaries, and ``peak`` = arguments + temporaries + outputs − aliased.
    """
    mem = step.lower(*args).compile().memory_analysis()
    out = {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
           "alias": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes)}
    return {**out, "peak": out["argument"] + out["temp"] + out["output"] - out["alias"]}
