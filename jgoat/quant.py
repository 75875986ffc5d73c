"""QLoRA's frozen base: bitsandbytes-exact NF4 (4-bit NormalFloat) kernels, dequantised per matmul inside jit.

``quantize_nf4(params)`` replaces targeted kernels by `NF4Kernel` pytree nodes; ``jgoat.apply`` computes the base
output of a module holding one itself (y = x · dequantize(W) + b), adapter or not, so any LoRA-family adapter or GOAT
trains on top. Under ``nn.scan`` only the current layer's kernel is dequantised (a temporary inside the loop body).

Storage (per layer, bitsandbytes' ``quantize_4bit(..., quant_type="nf4", compress_statistics=True)``):
  * the weight in TORCH layout W [out, in] = kernelᵀ, flattened row-major, cut into blocks of 64;
  * ``absmax`` per block; each element x/absmax (x times the fp32 reciprocal, clamped to [−1, 1]) takes the nearest
    NF4 code, an exact midpoint going to the LOWER code (``torch.bucketize(x, midpoints)``, CUDA's ``x > mid``);
  * two codes per byte, the first element in the HIGH nibble (an odd count is padded with the code of 0.0);
  * double quantisation: offset = mean(absmax); absmax − offset quantised blockwise (256) with the signed 8-bit
    dynamic map (`create_dynamic_map`) to uint8 codes plus one fp32 absmax2 per 256-block: 0.127 bit/param of
    statistics instead of 0.5.
Dequantisation is bitsandbytes' too: fp32 ``code[q] · absmax`` (absmax = ``dyn[q2] · absmax2 + offset``), then one
cast to the stored dtype (that of the original weights), which the module then promotes to its compute dtype.

Known differences from bitsandbytes' output, all in the 8-bit statistics of double quantisation (the packed 4-bit
codes, and the fp32 absmax without double quantisation, are bit-identical; tests/test_qlora.py checks both):
  * the mean for the offset is a fixed pairwise fp32 sum (identical on every backend, so the base fingerprint does
    not depend on where you quantise) where torch uses its own reduction order: the offset may differ in the last
    bit, and an 8-bit absmax code that sits on a rounding boundary may then differ by one step;
  * bitsandbytes' CPU backend (0.50 measured) quantises the 8-bit statistics through a 65536-entry lookup table,
    which is not exactly "nearest" near code midpoints (~0.1 % of them); jgoat takes the exact nearest code, as the
    CUDA kernel does;
  * an all-zero block gets the codes of 0.0, as bitsandbytes' default/CPU path (CUDA's 0·(1/0) = NaN can give
    code 0 instead); either dequantises to 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jgoat.core import (
    ADAPTER_KEY,
    AdapterConfig,
    Layout,
    get_at,
    iter_modules,
    layout_for,
    path_str,
    replace_at,
    select_targets,
    to_dict,
)

Array = jax.Array
PyTree = Any

# bitsandbytes' NF4 codebook (``get_4bit_type("nf4")``), the float32 values; METHODS.md lists the same numbers.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

DOUBLE_QUANT_BLOCK = 256


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit (CPU kernel).

    torch computes, in float32, step = (end − start) / (steps − 1), then ``start + step·i`` for the first half and
    ``end − step·(steps − 1 − i)`` for the rest, each with one fused multiply-add (one rounding). Both are exact in
    float64 here (24-bit step times an integer < 2^7 plus a float32), so one float64 evaluation rounded to float32 is
    the FMA's result.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(start32) + np.float64(step) * i
    high = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic (tree) 8-bit quantisation map, ``bitsandbytes.functional.create_dynamic_map``.

    Definition (bitsandbytes/functional.py; Dettmers, "8-Bit Approximations for Parallelism in Deep Learning",
    arXiv 1511.04561): a dynamic exponent and fraction. For i = 0 … max_exponent_bits − 1 it takes
    ``fraction_items = 2^(i + non_sign_bits − max_exponent_bits) + 1`` (signed; ``2^(… + 1) + 1`` unsigned) points
    ``boundaries = torch.linspace(0.1, 1, fraction_items)`` (float32), their midpoints
    ``means = (boundaries[:-1] + boundaries[1:]) / 2``, and adds ``10^(−(max_exponent_bits − 1) + i) · means`` (and
    its negative when signed), with non_sign_bits = total_bits − 1; then
    ``2^(non_sign_bits − max_exponent_bits) − 1`` additional items of the last exponent (none for the defaults), the
    values 0 and 1.0, zeros up to 256 entries, and sorts. All arithmetic is float32 as in torch (the python scale
    factor is rounded to float32 before the product). The signed default: 127 positive values in
    [5.5e-7, 0.99297], their negatives, 0 and 1.0 — 256 distinct values.

    Returns:
      float32 [2^total_bits], sorted ascending.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = _torch_linspace_f32(0.1, 1.0, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = _torch_linspace_f32(0.1, 1.0, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"dynamic map has {len(data)} values, expected {2**total_bits}")
    data += [0.0] * (256 - len(data))
    return np.sort(np.asarray(data, dtype=np.float32))


DYNAMIC_MAP = create_dynamic_map(signed=True)


def midpoints(code: np.ndarray) -> np.ndarray:
    """Decision boundaries of nearest-code quantisation: (c_i + c_{i+1}) / 2 in float32 (bitsandbytes' bounds)."""
    c = np.sort(np.asarray(code, np.float32))
    return ((c[:-1] + c[1:]) / np.float32(2.0)).astype(np.float32)


NF4_BOUNDS = midpoints(NF4_CODE)
DYNAMIC_BOUNDS = midpoints(DYNAMIC_MAP)


@struct.dataclass
class NF4Kernel:
    """A frozen linear kernel stored as NF4; stands where the ``kernel`` array was in a params tree.

    Arrays (leading ``*stack`` axes for stacked/scanned layers; ``nn.scan`` slices them like any param):
      codes: uint8 [*stack, ceil(n/2)], two NF4 codes per byte (first element in the high nibble), n = in·out,
        flattened row-major in torch layout [out, in].
      absmax: per 64-block scale: float32 [*stack, n_blocks], or uint8 codes [*stack, n_blocks] of
        (absmax − offset) in the dynamic map with double quantisation.
      absmax2: float32 [*stack, ceil(n_blocks / 256)] (double quantisation) or None.
      offset: float32 [*stack], mean of the absmax (double quantisation) or None.
    Static: ``layer_shape`` (one layer's Flax kernel shape [*in_dims, *out_dims]), ``n_in`` (how many of its dims
    are inputs), ``dtype`` (of the original weights: what `dequantize` returns by default) and the block sizes.
    """

    codes: Array
    absmax: Array
    absmax2: Array | None = None
    offset: Array | None = None
    layer_shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    n_in: int = struct.field(pytree_node=False, default=1)
    dtype: np.dtype = struct.field(pytree_node=False, default=np.dtype(np.float32))
    block_size: int = struct.field(pytree_node=False, default=64)
    block_size2: int = struct.field(pytree_node=False, default=DOUBLE_QUANT_BLOCK)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical kernel shape [*stack, *layer_shape] (what the unquantised array had)."""
        return (*self.stack_shape, *self.layer_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def layout(self) -> Layout:
        return Layout(n_stack=len(self.stack_shape), n_in=self.n_in)

    @property
    def in_features(self) -> int:
        return int(np.prod(self.layer_shape[: self.n_in], dtype=np.int64))

    @property
    def out_features(self) -> int:
        return int(np.prod(self.layer_shape[self.n_in:], dtype=np.int64))

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (codes and statistics)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))


def _nearest(x: Array, bounds: np.ndarray) -> Array:
    """Index of the nearest code given the sorted midpoints: #(bounds < x); an exact midpoint goes to the lower."""
    return jnp.searchsorted(jnp.asarray(bounds), x, side="left").astype(jnp.uint8)


def _blockwise(x: Array, block: int, bounds: np.ndarray) -> tuple[Array, Array]:
    """Blockwise absmax quantisation of a flat fp32 x [n]: (codes uint8 [n_blocks · block], absmax fp32 [n_blocks]).

    Padding (to whole blocks) is zeros, which change no absmax and take the code of 0.0. Each element is multiplied by
    the fp32 reciprocal of its block's absmax (as bitsandbytes) and clamped to [−1, 1]; an all-zero block maps to 0.
    """
    n_blocks = -(-x.shape[0] // block)
    x_NxB = jnp.pad(x, (0, n_blocks * block - x.shape[0])).reshape(n_blocks, block)
    absmax_N = jnp.max(jnp.abs(x_NxB), axis=1)
    nonzero = absmax_N > 0
    inv_N = jnp.where(nonzero, jnp.float32(1.0) / jnp.where(nonzero, absmax_N, 1.0), 0.0)
    scaled_NxB = jnp.clip(x_NxB * inv_N[:, None], -1.0, 1.0)
    return _nearest(scaled_NxB, bounds).reshape(-1), absmax_N


def _rounded(x: Array, nonneg: Array) -> Array:
    """x, opaque to the compiler, so that it stays the IEEE-rounded result of the op that made it.

    XLA always allows FMA contraction (CPU and GPU) and rewrites a division by a constant into a product with the
    rounded reciprocal, so ``a * b + c`` or ``s / n`` may round differently in different jit contexts (eagerly, in
    ``dequantize_tree``, inside the model). Adding an integer zero that XLA cannot prove zero (min(bits, 0) of a
    non-negative float array `nonneg`, broadcastable to x) to x's bits blocks both rewrites; it costs one int op.
    """
    zero = jnp.minimum(jax.lax.bitcast_convert_type(nonneg, jnp.int32), 0)
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.int32) + zero, jnp.float32)


def _pairwise_mean(x: Array) -> Array:
    """mean(x) in float32 by a fixed pairwise tree (zero-padded to a power of two): the same bits on every backend."""
    n = x.shape[0]
    size = 1 << max(n - 1, 0).bit_length()
    s = jnp.pad(x, (0, size - n))
    while s.shape[0] > 1:
        pairs = s.reshape(-1, 2)
        s = pairs[:, 0] + pairs[:, 1]
    return s[0] / _rounded(jnp.float32(n), jnp.abs(x[0]))


def _quantize_layer(kernel: Array, *, n_in: int, block_size: int, double_quant: bool) -> dict[str, Array]:
    """One (unstacked) Flax kernel [*in_dims, *out_dims] -> the NF4Kernel arrays (see the class docstring)."""
    n_in_features = int(np.prod(kernel.shape[:n_in], dtype=np.int64))
    w = kernel.reshape(n_in_features, -1).T.reshape(-1).astype(jnp.float32)  # torch layout [out, in], row-major
    n = w.shape[0]
    q, absmax = _blockwise(w, block_size, NF4_BOUNDS)
    q = q[: n + n % 2].reshape(-1, 2)
    out = {"codes": (q[:, 0] << 4) | q[:, 1], "absmax": absmax, "absmax2": None, "offset": None}
    if double_quant:
        offset = _pairwise_mean(absmax)
        q2, absmax2 = _blockwise(absmax - offset, DOUBLE_QUANT_BLOCK, DYNAMIC_BOUNDS)
        out.update(absmax=q2[: absmax.shape[0]], absmax2=absmax2, offset=offset)
    return out


@functools.partial(jax.jit, static_argnames=("n_stack", "n_in", "block_size", "double_quant"))
def _quantize_arrays(kernel: Array, *, n_stack: int, n_in: int, block_size: int, double_quant: bool):
    fn = functools.partial(_quantize_layer, n_in=n_in, block_size=block_size, double_quant=double_quant)
    if n_stack == 0:
        return fn(kernel)
    stack = kernel.shape[:n_stack]
    layers = kernel.reshape(-1, *kernel.shape[n_stack:])
    out = jax.lax.map(fn, layers)  # one layer at a time: the fp32 temporaries of one layer only
    return jax.tree.map(lambda a: a.reshape(*stack, *a.shape[1:]), out)


@functools.cache
def _sharded_quantize(codes, absmax, absmax2, offset) -> Callable:
    """:func:`_quantize_arrays` jitted with these output shardings."""
    return jax.jit(_quantize_arrays.__wrapped__, static_argnames=("n_stack", "n_in", "block_size", "double_quant"),
                   out_shardings={"codes": codes, "absmax": absmax, "absmax2": absmax2, "offset": offset})


def quantize(kernel: Array, layout: Layout | None = None, *, double_quant: bool = True,
             block_size: int = 64, sharding: NF4Kernel | None = None) -> NF4Kernel:
    """Quantise one (possibly stacked) Flax kernel to NF4.

    Args:
      kernel: [*stack, *in_dims, *out_dims] in any float dtype (remembered: `dequantize` returns it).
      layout: how its dims split (default: a Dense scanned over ndim − 2 leading axes, as ``jgoat.wrap``).
      double_quant: quantise the absmax statistics too (8-bit dynamic map, blocks of 256; bitsandbytes'
        ``compress_statistics=True``).
      block_size: elements per absmax block (bitsandbytes: 64 for NF4).
      sharding: an NF4Kernel of shardings (from ``jgoat.shardings``): the quantisation's output shardings, the
        codes and absmax are born sharded (same values).
    """
    if isinstance(kernel, NF4Kernel):
        raise ValueError("kernel is already NF4-quantised")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even integer, got {block_size!r}")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"only floating-point kernels can be quantised, got dtype {kernel.dtype}")
    layout = layout or Layout(n_stack=max(kernel.ndim - 2, 0), n_in=1)
    layout.split(kernel.shape)  # validates that there are output dims
    run = _quantize_arrays if sharding is None else _sharded_quantize(
        sharding.codes, sharding.absmax, sharding.absmax2, sharding.offset)
    arrays = run(kernel, n_stack=layout.n_stack, n_in=layout.n_in, block_size=block_size, double_quant=double_quant)
    return NF4Kernel(**arrays, layer_shape=tuple(int(d) for d in kernel.shape[layout.n_stack:]), n_in=layout.n_in,
                     dtype=np.dtype(kernel.dtype), block_size=block_size)


def dequantize_absmax(node: NF4Kernel) -> Array:
    """The fp32 per-block absmax [*stack, n_blocks] (``dyn[q2] · absmax2 + offset`` with double quantisation)."""
    if not node.double_quant:
        return node.absmax
    n_blocks = node.absmax.shape[-1]
    scale = jnp.repeat(node.absmax2, node.block_size2, axis=-1, total_repeat_length=node.absmax2.shape[-1]
                       * node.block_size2)[..., :n_blocks]
    product = _rounded(jnp.asarray(DYNAMIC_MAP)[node.absmax] * scale, scale)
    return product + node.offset[..., None]  # two roundings, as bitsandbytes (never an FMA)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_torch(node: NF4Kernel, dtype: Any = None) -> Array:
    """W in torch layout [*stack, out, in], computed in fp32 then cast once to `dtype` (default: the stored dtype)."""
    stack, block = node.stack_shape, node.block_size
    n = node.in_features * node.out_features
    codes = jnp.stack([node.codes >> 4, node.codes & 15], axis=-1).reshape(*stack, -1)
    absmax = dequantize_absmax(node)
    n_blocks = absmax.shape[-1]
    codes = jnp.pad(codes[..., :n], [(0, 0)] * len(stack) + [(0, n_blocks * block - n)])
    w = jnp.asarray(NF4_CODE)[codes].reshape(*stack, n_blocks, block) * absmax[..., None]
    w = w.reshape(*stack, -1)[..., :n].reshape(*stack, node.out_features, node.in_features)
    return w.astype(node.dtype if dtype is None else dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(node: NF4Kernel, dtype: Any = None) -> Array:
    """The Flax kernel [*stack, *layer_shape] the node stands for, in `dtype` (default: the original weights').

    Same values as ``dequantize_torch(node)ᵀ``, but built directly in [in, out] order: the 4-bit codes are transposed
    (as bytes) and each element gathers its block's absmax. A transposed float kernel would let XLA fold the
    transpose into the matmul (contracting W's other dim), a different kernel with a different summation order than
    the one an unquantised model runs; this way ``jgoat.apply`` on an NF4 tree computes exactly what the model
    computes on ``dequantize_tree`` of it.
    """
    stack, n_in, n_out = node.stack_shape, node.in_features, node.out_features
    codes = jnp.stack([node.codes >> 4, node.codes & 15], axis=-1).reshape(*stack, -1)[..., : n_in * n_out]
    codes_IxO = jnp.swapaxes(codes.reshape(*stack, n_out, n_in), -1, -2)
    i_IxO, o_IxO = jnp.meshgrid(jnp.arange(n_in), jnp.arange(n_out), indexing="ij")
    block_IxO = (o_IxO * n_in + i_IxO) // node.block_size  # flat torch-layout index -> its absmax block
    scale_IxO = jnp.take(dequantize_absmax(node), block_IxO, axis=-1)
    w_IxO = jnp.asarray(NF4_CODE)[codes_IxO] * scale_IxO
    return w_IxO.astype(node.dtype if dtype is None else dtype).reshape(node.shape)


def dequantize_tree(params: PyTree, dtype: Any = None) -> PyTree:
    """Replace every `NF4Kernel` in `params` by its dequantised kernel (plain arrays; adapters are kept).

    The result runs with the unmodified model (and ``jgoat.merge``); it is what the quantised tree computes.
    """
    return jax.tree.map(lambda x: dequantize(x, dtype) if isinstance(x, NF4Kernel) else x, params,
                        is_leaf=lambda x: isinstance(x, NF4Kernel))


def quantize_nf4(params: PyTree, *, targets: str | Sequence[str] = "all-linear", exclude: str | Sequence[str] = (),
                 layouts: Mapping[str, Layout] | None = None, double_quant: bool = True,
                 block_size: int = 64, shardings: Callable[[PyTree], PyTree] | None = None) -> dict:
    """QLoRA: store the targeted linear kernels of a base params tree as NF4 (`NF4Kernel`), bitsandbytes-exact.

    Quantise BEFORE ``jgoat.wrap`` (SVD inits such as PiSSA and GOAT then read the dequantised weights, so their
    frozen offsets match the base the model actually runs). Run the model with ``jgoat.apply``: it dequantises each
    kernel at its matmul, inside jit (under ``nn.scan`` one layer at a time), with or without an adapter.

    Args:
      params: a Flax ``params`` collection without adapters.
      targets, exclude: which linear modules, same rules as adapter configs; "all-linear" (default) is every
        Dense-like kernel except output heads (``lm_head`` etc. stay in full precision, as bitsandbytes/HF do).
      layouts: optional per-module `Layout` from ``jgoat.probe`` (DenseGeneral/Einsum kernels).
      double_quant: also quantise the per-block absmax (8 bits, blocks of 256).
      block_size: absmax block (64 as QLoRA).
      shardings: for params on a device mesh: a function from the (abstract) quantised tree to its shardings, e.g.
        ``functools.partial(jgoat.shardings, mesh=mesh)``; each kernel's codes and absmax are then born sharded
        (never gathered to one device). The arrays equal the unsharded quantisation's.

    Returns:
      The params tree with `NF4Kernel` nodes in place of the targeted kernels (biases and the rest untouched).

    Example:
      >>> qparams = jgoat.quantize_nf4(params)
      >>> wrapped = jgoat.wrap(qparams, jgoat.LoraConfig(rank=8), key=key)
      >>> out, aux = jgoat.apply(model.apply)({"params": wrapped}, x)
    """
    params = to_dict(params)
    adapted = [path_str(p) for p, m in iter_modules(params) if ADAPTER_KEY in m]
    if adapted:
        raise ValueError(f"params already hold adapters (e.g. at '{adapted[0]}'): quantise the base first, then "
                         "jgoat.wrap the quantised tree (SVD-based inits must read the quantised weights)")
    placed = None
    if shardings is not None:
        placed = shardings(jax.eval_shape(functools.partial(
            quantize_nf4, targets=targets, exclude=exclude, layouts=layouts, double_quant=double_quant,
            block_size=block_size), params))
    for path in select_targets(params, AdapterConfig(targets=targets, exclude=exclude), layouts):
        kernel = get_at(params, path)["kernel"]
        if isinstance(kernel, NF4Kernel):
            continue
        node = quantize(kernel, layout_for(path, kernel, layouts), double_quant=double_quant,
                        block_size=block_size, sharding=None if placed is None else get_at(placed, path)["kernel"])
        params = replace_at(params, path, lambda m, k=node: {**m, "kernel": k})
    return params


def linear_base(module: nn.Module, node: NF4Kernel, x: Array):
    """For ``jgoat.apply``'s interceptor: (kernel, base) of a linear-like module whose kernel is an NF4Kernel.

    ``kernel`` is this call's dequantised Flax kernel [*in_dims, *out_dims] in the stored dtype (adapters such as
    DoRA read it); ``base()`` computes what the module would with that kernel: promote to the module's dtype,
    contract the trailing input dims (``lax.dot_general`` as ``nn.Dense``/``DenseGeneral``), add the bias.
    """
    path = "/".join(module.path)
    if node.codes.ndim != 1:
        raise ValueError(f"NF4 kernel at '{path}' has {node.codes.ndim - 1} stacked layer axes but the module is "
                         "not scanned over them. Pass layouts=jgoat.probe(model, params, *inputs) to "
                         "jgoat.quantize_nf4 for DenseGeneral/Einsum kernels")
    kernel = dequantize(node)
    n_in = node.n_in

    def base() -> Array:
        in_dims = node.layer_shape[:n_in]
        if x.ndim < n_in or tuple(x.shape[x.ndim - n_in:]) != in_dims:
            raise ValueError(f"NF4 kernel at '{path}' contracts input dims {in_dims}, got input of shape {x.shape}; "
                             "only linears over the trailing input dims are supported")
        bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
        promote = getattr(module, "promote_dtype", nn.dtypes.promote_dtype)
        inputs, w, b = promote(x, kernel, bias, dtype=getattr(module, "dtype", None))
        dot_general = getattr(module, "dot_general", None) or jax.lax.dot_general
        y = dot_general(inputs, w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
                        precision=getattr(module, "precision", None))
        if b is not None:
            y = y + jnp.reshape(b, (1,) * (y.ndim - b.ndim) + b.shape)
        return y

    return kernel, base
